"""Root pytest configuration: notebooks run at their small ("quick") size in tests.

nbmake starts each notebook's kernel as a subprocess, which inherits this
environment. Set SLA_NB_QUICK=0 to execute the notebooks at full size.
"""
import os

os.environ.setdefault("SLA_NB_QUICK", "1")
