"""python -m batchrunner"""

from batchrunner.cli import main

main()
