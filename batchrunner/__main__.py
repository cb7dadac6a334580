"""python -m batchrunner"""

from batchrunner.cli.commands import main

main()
