"""Every registered gate × every backbone it declares it converts: the contract of ``gate_contract``.

One suite parametrized over the registries (as timm tests every model), so a new gate or backbone is covered by
registering it, and no pair is skipped: a gate without ``keep_all()`` cannot even register. Search-size
backbones (a name with "tiny" or "small") run every check in every session; the full-size layouts are deep
enough to take seconds per case on 2 cores, so they run forward, backward and keep-all on one 2-frame clip,
marked slow.
"""

from __future__ import annotations

import pytest
from gate_contract import (
    accepted_gates,
    check_backward,
    check_export,
    check_fine_tunes,
    check_forward,
    check_keep_all,
    check_macs,
    make_batch,
)

from gatesearch.backbones import BACKBONES

pytestmark = pytest.mark.usefixtures("quick_crossover")


def search_size(name: str) -> bool:
    return "tiny" in name or "small" in name


SMALL = [(b, g) for b in BACKBONES.list() if search_size(b) for g in accepted_gates(b)]
FULL = [pytest.param(b, g, marks=pytest.mark.slow) for b in BACKBONES.list() if not search_size(b)
        for g in accepted_gates(b)]


@pytest.fixture(scope="module")
def batch():
    return make_batch()


@pytest.fixture(scope="module")
def short_batch():
    """One 2-frame clip: enough for the deep full-size layouts."""
    return make_batch(clips=1, frames=2)


def pick(backbone: str, batch: dict, short_batch: dict) -> dict:
    return batch if search_size(backbone) else short_batch


@pytest.mark.parametrize(("backbone", "gate"), SMALL + FULL)
def test_forward(backbone, gate, batch, short_batch):
    check_forward(backbone, gate, pick(backbone, batch, short_batch))


@pytest.mark.parametrize(("backbone", "gate"), SMALL + FULL)
def test_backward(backbone, gate, batch, short_batch):
    check_backward(backbone, gate, pick(backbone, batch, short_batch))


@pytest.mark.parametrize(("backbone", "gate"), SMALL + FULL)
def test_keep_all_is_the_dense_network(backbone, gate, batch, short_batch):
    check_keep_all(backbone, gate, pick(backbone, batch, short_batch))


@pytest.mark.parametrize(("backbone", "gate"), SMALL)
def test_mac_accounting(backbone, gate, batch):
    check_macs(backbone, gate, batch)


@pytest.mark.parametrize(("backbone", "gate"), SMALL)
def test_fine_tunes_when_it_adds_parameters(backbone, gate, batch):
    check_fine_tunes(backbone, gate, batch)


@pytest.mark.parametrize(("backbone", "gate"), SMALL)
def test_export_round_trip(backbone, gate, batch, tmp_path):
    check_export(backbone, gate, batch, tmp_path)


def test_every_registered_gate_is_covered():
    """Each gate runs on at least one search-size backbone, so none escapes the contract."""
    from gatesearch.policies import POLICIES

    assert {g for _, g in SMALL} == set(POLICIES)
