"""`python -m dvtrain COMMAND ...`: the `dvtrain` command (`dvtrain.cli.main`), for a venv without its
console script on PATH and for launchers that start Python themselves: `torchrun -m dvtrain eval RUN_DIR`.

`torchrun dvtrain eval RUN_DIR` (no `--no-python`, no `-m`) runs `python -u dvtrain ...`: Python looks for a
file or folder named `dvtrain` in the current directory, never on PATH. In a source checkout's top folder
that is this package's folder, which Python runs through this file with the folder itself first on
sys.path; the folder's parent replaces it there, so the package is imported as a package (its modules
`data`, `config`, ... must not shadow top-level names). Elsewhere Python itself stops, before any dvtrain code
runs, with "can't open file '.../dvtrain'": the docs show the forms that work anywhere."""

import sys
from pathlib import Path

if __name__ == "__main__":
    if not __package__:  # run as `python path/to/dvtrain ...`
        here = Path(__file__).resolve().parent
        sys.path[:] = [str(here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != here]
    from dvtrain.cli import main

    sys.exit(main())
