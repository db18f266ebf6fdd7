"""Objectives of a trial: quality, MACs, measured latency, and training losses."""

from .latency import LatencyStats, measure_latency
from .losses import task_loss
from .macs import LayerMacs, MacCounter, MacReport, dense_macs, mac_report, reset_stats
from .quality import QualityDrop, heatmap_peaks, pck_correct, pck_radius, quality_drop, top1_correct

__all__ = [
    "LatencyStats", "measure_latency", "task_loss", "LayerMacs", "MacCounter", "MacReport", "dense_macs", "mac_report",
    "reset_stats", "QualityDrop", "heatmap_peaks", "pck_correct", "pck_radius", "quality_drop", "top1_correct",
]
