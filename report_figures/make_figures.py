"""Figures and results.md from reproduce.py's run directories (the work is in report_figures/figures.py).

    python report_figures/make_figures.py --runs output/report [--out report_figures] [--no_models]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from report_figures.figures import main  # noqa: E402

if __name__ == "__main__":
    main()
