"""Write the offline page of `dvc plots show` / `dvc plots diff` (.dvc/plots/offline.html).

    python scripts/build_offline_plots_page.py

The page carries Vega, Vega-Lite and Vega-Embed inline: the minified javascript_bundle of vl-convert-python,
pinned in pyproject.toml (deeper/plots.py picks the Vega-Lite version). Re-run it after changing that pin and
commit the page; tests/test_plots.py checks that the committed page is what this writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deeper.plots import OFFLINE_PAGE, build_offline_page

if __name__ == "__main__":
    target = Path(__file__).resolve().parents[1] / OFFLINE_PAGE
    target.write_text(build_offline_page(), encoding="utf-8")
    print(f"{OFFLINE_PAGE}: {target.stat().st_size:,} bytes")
