"""The GPU scripts' log: each line stamped with the seconds since the script started, printed and
appended to a file under $OUT (which comes back from the device machine even when a run is cut off)."""

import time
from pathlib import Path


def logger(path: Path, t0: float):
    """-> say(*parts): print '[  12.3 s] parts...' (seconds since t0) and append it to `path`."""

    def say(*parts):
        line = f"[{time.time() - t0:6.1f} s] " + " ".join(str(x) for x in parts)
        print(line, flush=True)
        with open(path, "a") as log:
            log.write(line + "\n")

    return say
