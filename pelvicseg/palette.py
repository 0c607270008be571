"""The classes' colours, one palette for the figures, the HTML report and the RTSTRUCT and SEG
outputs. Plain hex strings: no matplotlib here, so the DICOM writers and the report can colour
their classes without loading matplotlib's plotting machinery (figures.py draws with these)."""

from __future__ import annotations

CLASS_COLOURS = ["#00000000", "#f4a582", "#e6c229", "#4393c3", "#1b9e77", "#d6604d"]
# matplotlib's tab10, for classes beyond HipMRI's six (its last colour repeats past ten, as tab10 does)
TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
         "#17becf"]


def class_colours(num_classes: int) -> list[str]:
    """``num_classes`` colours: background transparent, HipMRI's five classes, then tab10."""
    extra = [TAB10[min(i, len(TAB10) - 1)] for i in range(max(0, num_classes - len(CLASS_COLOURS)))]
    return (CLASS_COLOURS + extra)[:num_classes]
