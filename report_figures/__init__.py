"""Reading finished runs: tables, figures and the study summary."""
