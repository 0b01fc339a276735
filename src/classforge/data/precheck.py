"""The file check, run in a second process while the command is still importing its libraries.

`classforge train` spends over a second importing torch and the training code, on one core. The check decodes
every file and needs none of that, so `start_check` runs it in a child process (`python -m
classforge.data.precheck`). The child writes the check's cache and spools the images it decoded into an unlinked
temporary file; `Precheck.wait` hands those images to the run's KeptImages. The run's own `validate` then finds
every file in the cache and every image it would have kept already there, as if it had decoded them itself.
A child that does more after the check (runtime.ahead computes features) runs `check_job` itself and reports the
rest through `Precheck.message`.

Whatever goes wrong in the child only loses the overlap: the run checks the remaining files itself."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import tempfile
import threading
from typing import TYPE_CHECKING

from classforge.core.config import TrainConfig
from classforge.core.cpu_load import count_as_own, stop_counting
from classforge.core.errors import ClassforgeError
from classforge.data.discover import Dataset, Sample, discover_for
from classforge.data.kept import KEEP_MB, MAX_KEPT_PIXELS, KeptImages, held_bytes

if TYPE_CHECKING:  # the command imports this module before it starts the child: nothing it does not need
    from classforge.data.validate import Validation


class Precheck:
    """A check running in a child process, for `ds`. The child reports on stdout, one JSON object a line, each
    with one key: "check" when the check is done (the images it spooled), then, where it does more (runtime.ahead),
    "progress" as it goes and a last message of its own kind."""

    def __init__(self, ds: Dataset, proc: subprocess.Popen, spool):
        self.ds = ds
        self._proc = proc
        self._spool = spool  # the unlinked file the child writes decoded pixels to
        self._got: dict[str, dict] = {}  # kind -> the latest message of that kind
        self._ended = False
        self._news = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)  # a full pipe would stall the child
        self._reader.start()

    def _read(self) -> None:
        try:
            for line in self._proc.stdout:
                message = _parse(line)
                with self._news:
                    self._got.update(message)
                    self._news.notify_all()
        except (OSError, ValueError):  # the pipe was closed under the reader: the run is done with the child
            pass
        with self._news:
            self._ended = True
            self._news.notify_all()

    def message(self, kind: str, on_progress=None) -> dict | None:
        """The child's message of `kind`, once it has written it; None if it ended (or failed) first.
        `on_progress(done, total)` hears of "progress" messages meanwhile."""
        shown = None
        with self._news:
            while kind not in self._got and not self._ended:
                self._news.wait(0.2)
                progress = self._got.get("progress")
                if on_progress is not None and progress is not None and progress != shown:
                    shown = progress
                    on_progress(progress.get("done", 0), progress.get("total", 0))
            return self._got.get(kind)

    def wait(self, kept: KeptImages | None) -> bool:
        """Wait for the check; give `kept` the images the child decoded. False when the check did not complete (the
        run's validate then checks the files itself)."""
        try:
            done = self.message("check")
            if done is None:
                return False
            if kept is not None and done.get("kept"):
                _hand_over(self._spool, done["kept"], kept)
            return True
        except (OSError, ValueError, KeyError, TypeError):
            return False
        finally:
            self._spool.close()  # the pixels stay mapped for `kept`

    def close(self) -> None:
        """Stop the child if it still runs, and let go of the spool (its pixels stay mapped for `kept`)."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        stop_counting(self._proc.pid)
        self._reader.join()  # the child is gone, so its output has ended
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._spool.close()


def start_check(cfg: TrainConfig, keep: bool = True, child: str = __name__, more: dict | None = None
                ) -> Precheck | None:
    """Discover cfg's data and start checking it in a child process; None where that is not possible (not a
    POSIX system, data that cannot be discovered: the run says why) or not wanted (CLASSFORGE_NO_PRECHECK=1).
    `keep`: spool the decoded images. `child`: the module the child runs, this one or one that checks with
    `check_job` and then does more (`more` goes into its job)."""
    if os.name != "posix" or os.environ.get("CLASSFORGE_NO_PRECHECK") == "1":
        return None
    try:
        ds = discover_for(cfg)
    except (ClassforgeError, OSError):
        return None  # the run reports it in its place, after its own checks of the options
    spool = tempfile.TemporaryFile(dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    job = {"root": ds.root, "task": ds.task, "min_size": cfg.min_size, "max_pixels": cfg.max_pixels,
           "samples": [[s.path, s.rel] for s in ds.samples], "spool_fd": spool.fileno() if keep else -1,
           "keep_mb": KEEP_MB, "more": more}
    env = {**os.environ, "CLASSFORGE_QUIET": "1"}  # the run shows the check's progress; the child stays silent
    try:
        proc = subprocess.Popen([sys.executable, "-m", child], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                                pass_fds=(spool.fileno(),))
    except OSError:
        spool.close()
        return None
    count_as_own(proc.pid)  # its CPU time is the run's, not a sign of a busy machine
    try:
        proc.stdin.write(json.dumps(job))
        proc.stdin.close()
    except OSError:  # the child is already gone: the run checks the files itself
        _end(proc)
        spool.close()
        return None
    return Precheck(ds, proc, spool)


def _end(proc: subprocess.Popen) -> None:
    """Stop a child that cannot do its job and collect it, so that no zombie is left."""
    proc.kill()
    for pipe in (proc.stdin, proc.stdout):
        try:
            pipe.close()
        except OSError:
            pass
    proc.wait()


def _parse(line: str) -> dict:
    try:
        message = json.loads(line)
    except ValueError:
        return {}
    if not isinstance(message, dict) or len(message) != 1 or not isinstance(next(iter(message.values())), dict):
        return {}
    return message


def _hand_over(spool, entries: list, kept: KeptImages) -> None:
    """Map the spool and offer each image in it to `kept`, to be built from the mapped bytes when taken."""
    size = os.fstat(spool.fileno()).st_size
    if size == 0:
        return
    view = memoryview(mmap.mmap(spool.fileno(), size, prot=mmap.PROT_READ))
    for path, offset, mode, width, height in entries:
        n = width * height * len(mode)
        if offset + n <= size:
            kept.offer_spooled(path, view[offset:offset + n], mode, (width, height))


class Spool:
    """What the child gives validate as `keep`: decoded images, appended raw to the spool file, within the
    KeptImages budget and size limit."""

    def __init__(self, fd: int, max_mb: float):
        self.file = os.fdopen(fd, "wb", buffering=0)
        self.max_bytes = int(max_mb * 2**20)
        self.used = 0
        self.entries: list = []
        self._lock = threading.Lock()

    def offer(self, path: str, img) -> None:
        if img.width * img.height > MAX_KEPT_PIXELS or img.mode not in ("RGB", "L"):
            return
        data = img.tobytes()
        with self._lock:
            if self.used + held_bytes(img) > self.max_bytes:
                return
            try:
                offset = self.file.tell()
                complete = self.file.write(data) == len(data)
            except OSError:
                complete = False
            if not complete:  # a full /dev/shm: the run decodes the rest again
                self.max_bytes = 0
                return
            self.used += held_bytes(img)
            self.entries.append([path, offset, img.mode, img.width, img.height])


def check_job(job: dict, keep=None) -> Validation:
    """The child's check of `job`, reported on stdout (first line: the images it spooled); `keep` also gets every
    image the check decodes."""
    from classforge.data.validate import validate

    samples = [Sample(path, rel, "") for path, rel in job["samples"]]
    ds = Dataset(job["root"], job["task"], samples, "precheck")
    spool = Spool(job["spool_fd"], job["keep_mb"]) if job["spool_fd"] >= 0 and ds.task == "image" else None
    keepers = [k for k in (spool, keep) if k is not None]
    checked = validate(ds, job["min_size"], job["max_pixels"],  # as the run itself would check them
                       keep=keepers[0] if len(keepers) == 1 else _Both(keepers) if keepers else None)
    sys.stdout.write(json.dumps({"check": {"kept": spool.entries if spool else []}}) + "\n")
    sys.stdout.flush()
    return checked


class _Both:
    def __init__(self, keepers: list):
        self.keepers = keepers

    def offer(self, path: str, img) -> None:
        for k in self.keepers:
            k.offer(path, img)


def read_job() -> dict:
    return json.loads(sys.stdin.read())


if __name__ == "__main__":
    check_job(read_job())
