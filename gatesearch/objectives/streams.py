"""Throughput of many independent video streams, one worker each: how a box serving many cameras uses its cores.

A single stream at batch 1 leaves a core's worth of work per op to split
between threads; with several cameras the natural split is one stream per
core, each running its own network with one intra-op thread. Torch's
intra-op thread count is per process, and a gated frame spends part of its
time in Python (between layers, in the gates), which holds the GIL: worker
*processes* give every stream its own interpreter and thread pool, worker
*threads* share both (``workers="thread"`` measures what that costs).

Every worker holds its own copy of each model (gated layers keep per-stream
state), and all workers start a round together; a round's throughput is the
frames of all streams over the wall time from the first start to the last
finish. Rounds alternate dense and gated, so load changes hit both alike.
"""

from __future__ import annotations

import copy
import multiprocessing
import statistics
import threading
import time
from collections.abc import Mapping

import torch
from torch import nn

WORKERS = ("process", "thread")
BARRIER_TIMEOUT_S = 300  # a worker that never reaches the start line fails the round instead of hanging it


def offset_streams(clip: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``n`` streams from one clip (1, T, 3, H, W): stream i starts i·T/n frames in (and wraps around), so the
    streams are at different moments of the footage."""
    t = clip.shape[1]
    return [torch.roll(clip, -(i * t // n), dims=1) for i in range(n)]


def stream_throughput(models: Mapping[str, nn.Module], streams: list[torch.Tensor], *, reset_every: int | None,
                      workers: str = "process", repeats: int = 3) -> dict[str, dict]:
    """Per model (by label): frames/s of all ``streams`` run at once, one single-threaded worker per stream.

    Returns {label: {"fps": median over rounds, "fps_rounds": [...], "ms_per_frame": median per-stream latency}}.
    """
    if workers not in WORKERS:
        raise ValueError(f"workers must be one of {', '.join(WORKERS)}, got {workers!r}")
    models = {label: m.eval() for label, m in models.items()}
    pool = _Processes(models, streams, reset_every) if workers == "process" else _Threads(models, streams, reset_every)
    frames = sum(s.shape[1] for s in streams)
    rounds: dict[str, list[tuple[float, float]]] = {label: [] for label in models}  # (wall s, median stream s)
    try:
        for label in models:  # warm-up: allocations, kernel choices, crossover calibration
            pool.run(label)
        for _ in range(repeats):
            for label in models:
                spans = pool.run(label)  # per stream: (start, end) on a clock all workers share
                wall = max(end for _, end in spans) - min(start for start, _ in spans)
                rounds[label].append((wall, statistics.median(end - start for start, end in spans)))
    finally:
        pool.close()
    per_stream_frames = frames / len(streams)
    return {label: {"fps": statistics.median(frames / wall for wall, _ in r),
                    "fps_rounds": [frames / wall for wall, _ in r],
                    "ms_per_frame": 1000 * statistics.median(s for _, s in r) / per_stream_frames}
            for label, r in rounds.items()}


def compare_throughput(dense: nn.Module, gated: Mapping[str, nn.Module], streams: list[torch.Tensor], *,
                       reset_every: int | None, workers: str = "process", repeats: int = 3) -> dict[str, dict]:
    """Per gated model (by label): its frames/s over ``streams`` beside the dense twin's, rounds interleaved; the
    speedup is the median of per-round ratios."""
    fps = stream_throughput({"dense": dense, **gated}, streams, reset_every=reset_every, workers=workers,
                            repeats=repeats)
    d = fps["dense"]
    return {label: {"dense_fps": d["fps"], "gated_fps": fps[label]["fps"],
                    "speedup": statistics.median(g / dr for g, dr in zip(fps[label]["fps_rounds"], d["fps_rounds"])),
                    "dense_ms_per_frame": d["ms_per_frame"], "gated_ms_per_frame": fps[label]["ms_per_frame"]}
            for label in gated}


def _stream_once(model: nn.Module, clip: torch.Tensor, reset_every: int | None) -> tuple[float, float]:
    with torch.inference_mode():
        start = time.perf_counter()
        model.stream(clip, reset_every=reset_every)
        return start, time.perf_counter()


class _Threads:
    """One thread per stream in this process; torch runs one intra-op thread (the count is process-wide)."""

    def __init__(self, models: Mapping[str, nn.Module], streams: list[torch.Tensor], reset_every: int | None) -> None:
        self.copies = [{label: copy.deepcopy(m) for label, m in models.items()} for _ in streams]
        self.streams, self.reset_every = streams, reset_every
        self.saved_threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def run(self, label: str) -> list[tuple[float, float]]:
        replies: list = [None] * len(self.streams)
        barrier = threading.Barrier(len(self.streams))

        def work(i: int) -> None:
            barrier.wait()
            replies[i] = _reply(self.copies[i][label], self.streams[i], self.reset_every)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(self.streams))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return _spans(replies)

    def close(self) -> None:
        torch.set_num_threads(self.saved_threads)


class _Processes:
    """One forked process per stream, holding its copy of every model; commands and timings go over pipes."""

    def __init__(self, models: Mapping[str, nn.Module], streams: list[torch.Tensor], reset_every: int | None) -> None:
        ctx = multiprocessing.get_context("fork")  # the children inherit the models and the loaded kernels
        barrier = ctx.Barrier(len(streams))
        self.pipes, self.procs = [], []
        try:
            for clip in streams:
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_serve, args=(child, barrier, models, clip, reset_every), daemon=True)
                proc.start()
                child.close()
                self.pipes.append(parent)
                self.procs.append(proc)
        except BaseException:
            self.close()  # the workers started so far
            raise

    def run(self, label: str) -> list[tuple[float, float]]:
        for pipe in self.pipes:
            pipe.send(label)
        replies = []
        for pipe, proc in zip(self.pipes, self.procs):
            try:
                replies.append(pipe.recv())
            except EOFError:
                raise RuntimeError(f"stream worker {proc.pid} died (exit code {proc.exitcode})") from None
        return _spans(replies)

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join()


def _serve(pipe, barrier, models: Mapping[str, nn.Module], clip: torch.Tensor, reset_every: int | None) -> None:
    """A stream worker: one intra-op thread; per command, wait for the others, stream the clip, report the span."""
    torch.set_num_threads(1)
    while (label := pipe.recv()) is not None:
        try:
            barrier.wait(timeout=BARRIER_TIMEOUT_S)
        except threading.BrokenBarrierError:
            pipe.send(("error", "the other stream workers never started"))
            continue
        pipe.send(_reply(models[label], clip, reset_every))


def _reply(model: nn.Module, clip: torch.Tensor, reset_every: int | None) -> tuple[str, object]:
    """("ok", (start, end)) of one pass over the clip, or ("error", message): a worker reports, the caller raises."""
    try:
        return "ok", _stream_once(model, clip, reset_every)
    except Exception as e:
        return "error", f"{type(e).__name__}: {e}"


def _spans(replies: list[tuple[str, object]]) -> list[tuple[float, float]]:
    errors = [message for status, message in replies if status == "error"]
    if errors:
        raise RuntimeError(f"a stream worker failed: {errors[0]}")
    return [span for _, span in replies]
