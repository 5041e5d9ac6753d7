"""A stage's run folder: whether it is finished, interrupted or made differently, and every write into it.

    runs/<name>/identity.json     what the run is (resolved config + parent and teacher hashes)
    runs/<name>/config.toml       the resolved config
    runs/<name>/metrics.jsonl     one line per epoch
    runs/<name>/state/            the resumable training state, swapped in atomically
    runs/<name>/model.safetensors written last: its presence means finished

One command at a time writes a run folder: process 0 holds an exclusive lock on it (`FolderLock`) from the moment it
opens the folder until the run ends, and a second command is refused with a sentence. Every write goes through
`on_main`, so when one process fails to write, every process stops with the same sentence instead of the others
waiting for it forever; a state whose files are damaged is refused (or, with --overwrite, replaced), never loaded. With several processes, every one must see the same folder
(one shared filesystem): that is checked when the folder opens, and what the folder holds is decided by process 0
alone and told to the others, so they all take the same path.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from accelerate import Accelerator
from rich.markup import escape
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from distill.weights.checkpoint import EMA_FILE, MODEL_FILE, Checkpoint, atomic_write_bytes, read_checkpoint
from distill.config import StageConfig, config_differences, to_dict, write_toml
from distill.console import console
from distill.errors import DistillError
from distill.teachers.cache import MANIFEST as CACHE_MANIFEST
from distill.training.waiting import shared_outcome

STATE_DIR, STATE_TMP, STATE_OLD = "state", "state.tmp", "state.old"
IDENTITY_FILE, CONFIG_FILE, METRICS_FILE, PROGRESS_FILE, EMA_STATE = (
    "identity.json", "config.toml", "metrics.jsonl", "progress.json", "ema.safetensors")


def normalise(value: Any) -> Any:
    """JSON round trip, so identities compare equal however they were built."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


@dataclass
class FolderStatus:
    """What a run folder holds, compared with the run about to start."""

    state: str  # empty | finished | interrupted | changed-finished | changed-interrupted | damaged | busy
    detail: str = ""
    checkpoint: Checkpoint | None = None
    progress: dict[str, int] | None = None


def describe_change(stored: dict[str, Any], identity: dict[str, Any]) -> str:
    changes = config_differences(stored.get("config", {}), identity.get("config", {}))
    for key in sorted(set(stored) | set(identity)):
        if key != "config" and stored.get(key) != identity.get(key):
            changes.append(f"{key} checkpoint changed" if key in ("parent", "teacher") else f"{key} changed")
    return "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "") or "settings changed"


def saved_progress(run_dir: Path) -> tuple[Path, dict[str, int]] | None:
    """The last complete saved state and its progress (a swap interrupted between renames leaves state.old)."""
    for name in (STATE_DIR, STATE_OLD):
        marker = run_dir / name / PROGRESS_FILE
        if marker.exists():
            try:
                return marker.parent, json.loads(marker.read_text())
            except (OSError, ValueError):  # a damaged marker: the state is damaged (state_damage says so)
                return marker.parent, {}
    return None


# Settings added after runs were first recorded, and what a record without one was made with (None: whatever its
# processes made of it), so that a run recorded before them still names the same run.
# A callable gives the implied value from the old record's config: before --opt-eps each optimizer used its own timm
# default, which was 1e-8 for AdamW and Adam (and SGD takes none); a record of another optimizer implies nothing.
LATER_SETTINGS: dict[str, Any] = {"global_batch": None, "sync_bn": False, "fusion": "softmax", "bn": None,
                                  "teacher_res": "student",  # a teacher cache's, before it read at a teacher's own
                                  "opt_eps": lambda old: 1e-8 if old.get("opt", "adamw") in ("adamw", "adam", "sgd",
                                                                                             "momentum") else "?"}


def as_recorded(stored: dict[str, Any], identity: dict[str, Any]) -> dict[str, Any]:
    """`identity` without the settings `stored` predates, where they hold the value the record implies."""
    config, old = dict(identity.get("config") or {}), stored.get("config") or {}
    for key, implied in LATER_SETTINGS.items():
        implied = implied(old) if callable(implied) else implied
        if key not in old and key in config and (implied is None or config[key] == implied):
            del config[key]
    return {**identity, "config": config}


def folder_status(run_dir: Path, identity: dict[str, Any]) -> FolderStatus:
    """Is this run already done, half done, or done differently? (read-only)"""
    identity = normalise(identity)
    model_path, identity_path = run_dir / MODEL_FILE, run_dir / IDENTITY_FILE
    if model_path.exists():
        try:
            ckpt = read_checkpoint(model_path)
            stored = ckpt.meta.get("identity") or {}
        except DistillError:
            ckpt, stored = None, {}
        if ckpt is not None and stored == as_recorded(stored, identity):
            return FolderStatus("finished", checkpoint=ckpt)
        return FolderStatus("changed-finished", describe_change(stored, as_recorded(stored, identity)))
    if identity_path.exists():
        try:
            stored = json.loads(identity_path.read_text())
        except (OSError, json.JSONDecodeError):
            stored = {}
        saved = saved_progress(run_dir)
        if stored != as_recorded(stored, identity):
            return FolderStatus("changed-interrupted", describe_change(stored, as_recorded(stored, identity)),
                                progress=saved[1] if saved else None)
        if saved is not None and not saved[1]:
            return FolderStatus("damaged", f"{PROGRESS_FILE} cannot be read", progress=saved[1])
        return FolderStatus("interrupted", progress=saved[1] if saved else None)
    return FolderStatus("empty")


def state_files(state: Path) -> list[str] | str:
    """The names of a saved state's files, or what makes the folder unreadable."""
    try:
        return sorted(p.name for p in state.iterdir() if p.is_file())
    except OSError as error:
        return f"cannot read {state.name}: {error.strerror or error}"


def state_damage(state: Path, names: list[str]) -> str | None:
    """What is wrong with these files of a saved state (truncated, or their bytes changed), without loading them: a
    safetensors file must be as long as its header says, and every file torch.save wrote (a zip archive) must pass
    its CRC checks. None when every file is whole."""
    for path in (state / name for name in names):
        try:
            if path.suffix == ".safetensors":
                with open(path, "rb") as handle:
                    length = int.from_bytes(handle.read(8), "little")
                    header = json.loads(handle.read(length)) if 0 < length < 100_000_000 else None
                if not isinstance(header, dict):
                    return f"{path.name} has no readable header"
                end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
                if path.stat().st_size != 8 + length + end:
                    return f"{path.name} is {path.stat().st_size} bytes where its header says {8 + length + end}"
            elif path.suffix in (".bin", ".pkl", ".pt"):
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
                if bad is not None:
                    return f"{path.name} fails its checksum ({bad})"
        except (OSError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile) as error:
            return f"{path.name} cannot be read ({'truncated or not a torch file' if isinstance(error, zipfile.BadZipFile) else error})"
    return None


class FolderLock:
    """An exclusive lock on one run folder, held by process 0 of the command writing it (a POSIX lock on a file in the
    machine's temporary folder named after the folder's absolute path; the lock goes with the process, so a killed
    command never leaves the folder locked, and forked loader workers never hold it). It guards against a second command on the same machine; commands on
    two machines writing one shared folder are not seen. Within one process the lock is taken again freely, so a
    pipeline's stages and a retried command run in turn."""

    held: ClassVar[dict[str, int]] = {}  # absolute run folder -> the descriptor holding its lock, in this process

    def __init__(self, run_dir: Path):
        self.key = str(run_dir.resolve())
        digest = hashlib.sha256(self.key.encode()).hexdigest()[:24]
        self.path = Path(tempfile.gettempdir()) / f"distill-locks-{getattr(os, 'getuid', lambda: 0)()}" / f"{digest}.lock"

    def acquire(self) -> str | None:
        """None once this process holds the lock; else who holds it ("process N"), as far as the lock file says."""
        try:
            import fcntl
        except ImportError:  # Windows: no fcntl; the folder is not guarded
            return None
        if self.key in FolderLock.held:
            return None
        try:
            self.path.parent.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:  # no usable temporary folder: run unguarded rather than not at all
            return None
        try:  # a POSIX record lock: held by this process alone, not by the loader workers it forks
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.read(fd, 64).decode(errors="replace").strip()
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                return f"process {holder}" if holder.isdigit() else "another process"
            return None  # a filesystem without locks: unguarded
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        FolderLock.held[self.key] = fd
        return None

    def release(self) -> None:
        fd = FolderLock.held.pop(self.key, None)
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the lock


# Seconds another machine may take to see a file process 0 just made in the work folder: NFS clients cache what a
# folder holds (and that it does not exist) for up to a minute by default. At most a quarter of --dist-timeout, which
# process 0 spends waiting meanwhile.
SHARED_PATIENCE = 90.0


def _appears(folder: Path, name: str, patience: float) -> bool:
    """Whether `folder/name` is seen within `patience` seconds; listing the folder (and its parent) makes an NFS
    client look again instead of trusting its cache."""
    deadline = time.monotonic() + patience
    while True:
        for where in (folder.parent, folder):
            try:
                os.listdir(where)
            except OSError:
                pass
        if (folder / name).exists():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(1.0)


def recorded_settings(run_dir: Path) -> dict[str, Any]:
    """How the run already in this folder (finished, interrupted, or a teacher cache) batched and computed: its global
    batch, per-process batch, accumulation and precision as recorded (empty for an empty folder; no global batch for
    a run recorded before there was one)."""
    try:
        if (run_dir / MODEL_FILE).exists():
            stored = read_checkpoint(run_dir / MODEL_FILE).meta.get("identity") or {}
        elif (run_dir / IDENTITY_FILE).exists():
            stored = json.loads((run_dir / IDENTITY_FILE).read_text())
        elif (run_dir / CACHE_MANIFEST).exists():
            stored = json.loads((run_dir / CACHE_MANIFEST).read_text()).get("identity") or {}
        else:
            return {}
    except (DistillError, OSError, json.JSONDecodeError, AttributeError):
        return {}
    config = stored.get("config") or {}
    return {key: config.get(key) for key in ("global_batch", "batch_size", "grad_accum", "mixed_precision")}


def _size(count: int) -> str:
    return f"{count / 1e9:.1f} GB" if count >= 1e9 else f"{count / 1e6:.1f} MB"


def _reason(error: BaseException) -> str:
    code = getattr(error, "errno", None)
    if code == errno.ENOSPC or "No space" in str(error):
        return "no space left on the device"
    if code == errno.EDQUOT:
        return "disk quota exceeded"
    if code == errno.EFBIG or "FileTooLarge" in str(error) or "too large" in str(error):
        return "file too large"
    return "the file could not be written"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunFolder:
    """One run's folder: finished runs are reused, interrupted ones resumed, conflicting ones refused."""

    def __init__(self, config: StageConfig, identity: dict[str, Any], accelerator: Accelerator):
        self.config, self.accelerator = config, accelerator
        self.dir = config.run_dir()
        self.identity = normalise(identity)
        self.created: list[Path] = []  # folders this command made (deepest first): taken back if it fails
        self.replacing = False  # a different run is here and --overwrite replaces it, once the inputs have proved usable
        self.started = False
        self.lock = FolderLock(self.dir)

    def open(self) -> Checkpoint | None:
        """The finished checkpoint when this exact run is done; otherwise make the folder ready to resume or
        start, refusing to replace a different run unless --overwrite."""
        self._check_shared()
        status, state, names = None, None, []
        if self.accelerator.is_main_process:
            holder = self.lock.acquire()
            status = FolderStatus("busy", holder) if holder else folder_status(self.dir, self.identity)
            saved = saved_progress(self.dir) if status.state == "interrupted" else None
            state, names = (saved[0], state_files(saved[0])) if saved else (None, [])
            if isinstance(names, str):
                status, names = FolderStatus("damaged", names, progress=status.progress), []
        # one verdict: processes that read the folder at other moments agree
        status, state, names = self._from_main((status, state, names))
        if names:  # every file is read in full: each process reads its share at once, so none waits for the others'
            rank, world = self.accelerator.process_index, self.accelerator.num_processes
            found = self._from_all(state_damage(state, names[rank::world]))
            damage = next((what for what in found if what), None)
            if damage:
                status = FolderStatus("damaged", damage, progress=status.progress)
        if status.state == "busy":
            raise DistillError(f"Another distill command ({status.detail}) is writing to {self.dir}; wait for it to "
                               "finish, or pass --name (or --workdir) to write elsewhere.")
        try:
            return self._decide(status)
        except BaseException:
            self.close()
            raise

    def _decide(self, status: FolderStatus) -> Checkpoint | None:
        if status.state == "finished":
            self.close()  # nothing will be written
            return status.checkpoint
        if status.state == "changed-interrupted" and status.progress is None:
            status.state = "stale"  # started with other settings but nothing saved: nothing to lose
        if status.state == "damaged" and not self.config.overwrite:
            raise DistillError(f"The saved state in {self.dir / STATE_DIR} is damaged ({status.detail}), so the run "
                               "cannot resume; pass --overwrite to start it again (its state and metrics are replaced).")
        if status.state in ("changed-finished", "changed-interrupted") and not self.config.overwrite:
            what = "a finished run" if status.state == "changed-finished" else "an interrupted run"
            hint = "run the same command as before to resume it, " if status.state == "changed-interrupted" else ""
            raise DistillError(f"{self.dir} already holds {what} with different settings ({status.detail}); {hint}"
                               "pass --overwrite to replace it, or --name to write elsewhere.")
        self.replacing = status.state in ("changed-finished", "changed-interrupted", "stale", "damaged")
        if self.replacing and status.state != "stale" and self.accelerator.is_main_process:
            what = {"changed-finished": "a finished run with different settings",
                    "changed-interrupted": "an interrupted run with different settings",
                    "damaged": "a damaged saved state"}[status.state]
            console.print(f"--overwrite: {escape(str(self.dir))} holds {what} ({escape(status.detail)}); it is replaced "
                          "once this run's inputs have loaded.", soft_wrap=True)
        self.created = [p for p in [self.dir, *self.dir.parents] if not p.exists()]
        self.on_main(self._probe_writable, everywhere=True)  # fail now, before any data is loaded
        return None

    def close(self) -> None:
        """The run is over (finished, failed or reused): another command may write the folder."""
        self.lock.release()

    def _from_main(self, value: Any) -> Any:
        """Process 0's value, on every process (a collective: every process calls it)."""
        if self.accelerator.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def _from_all(self, value: Any) -> list[Any]:
        """Every process's value, on every process (a collective: every process calls it)."""
        if self.accelerator.num_processes == 1:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])

    def _check_shared(self) -> None:
        """Every process sees the work folder process 0 sees: it leaves a file there and each process looks for it.
        Without a shared filesystem the processes would each decide alone what the run folder holds, and their
        collectives would stop matching (a hang); instead they stop here, with one sentence."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return
        from accelerate.utils import gather_object

        root = Path(self.config.workdir)
        probe, made = None, []
        if acc.is_main_process:
            made = [p for p in [root, *root.parents] if not p.exists()]
            try:
                root.mkdir(parents=True, exist_ok=True)
                probe = root / f".distill-shared-{secrets.token_hex(6)}"
                probe.write_bytes(b"")
            except OSError:  # not writable: the probe of the run folder says so in its own sentence
                probe = None
        name = self._from_main(probe.name if probe is not None else None)
        patience = min(SHARED_PATIENCE, self.config.dist_timeout / 4)
        seen = gather_object([name is None or acc.is_main_process or _appears(root, name, patience)])
        if acc.is_main_process:
            if probe is not None:
                probe.unlink(missing_ok=True)
            for folder in made:  # deepest first: taken back, as the probe of the run folder does
                try:
                    folder.rmdir()
                except OSError:
                    break
        blind = [rank for rank, ok in enumerate(seen) if not ok]
        if blind:
            which = "process" if len(blind) == 1 else "processes"
            raise DistillError(f"The work folder {root} that process 0 writes is not there for {which} "
                               f"{', '.join(map(str, blind))}: every process must share the work folder (one filesystem "
                               "all machines mount, e.g. NFS or Lustre; pass a --workdir on it).")

    def has_state(self) -> bool:
        return saved_progress(self.dir) is not None

    def abandon(self) -> None:
        """After a failure: keep a saved state (the run resumes from it), else take back every file and folder
        this command made, so a failed command leaves nothing behind. Best effort, on the main process alone and
        without collectives: other processes may have stopped already."""
        if not (self.started and self.accelerator.is_main_process) or self.has_state():
            return
        try:
            self._clear()
            for folder in self.created:
                folder.rmdir()
        except OSError:  # something else is in it (or appeared meanwhile): keep it
            pass

    def _probe_writable(self) -> None:
        """Create the folder and take back what was created: a run that fails on its inputs leaves nothing."""
        missing = [p for p in [self.dir, *self.dir.parents] if not p.exists()]
        for attempt in range(5):  # other processes probe at the same time, and may remove what this one just saw
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                break
            except (FileExistsError, FileNotFoundError):
                if attempt == 4:
                    raise
        for folder in missing:  # deepest first
            try:
                folder.rmdir()
            except OSError:  # another process filled it meanwhile: keep it
                break

    def _clear(self) -> None:
        for name in (MODEL_FILE, EMA_FILE, IDENTITY_FILE, METRICS_FILE, CONFIG_FILE):
            (self.dir / name).unlink(missing_ok=True)
        for name in (STATE_DIR, STATE_TMP, STATE_OLD):
            shutil.rmtree(self.dir / name, ignore_errors=True)

    def on_main(self, action: Callable[[], Any], everywhere: bool = False, doing: str = "writing into the run folder"
                ) -> None:
        """Run a file write on the main process (or on every process); if it fails anywhere, every process stops
        with the same sentence, rather than the others waiting for one that has gone. The others wait outside any
        collective (distill.training.waiting): a write may take longer than --dist-timeout while it goes on."""
        problem = shared_outcome(lambda: self._attempt(action), everywhere or self.accelerator.is_main_process,
                                 self.config.dist_timeout, doing)
        if problem:
            raise DistillError(problem)

    def _attempt(self, action: Callable[[], Any]) -> str | None:
        """Run a write; the sentence for its failure, or None."""
        try:
            action()
        except PermissionError:
            return f"The work folder {self.config.workdir} is not writable."
        except DistillError as error:
            return error.sentence
        except OSError as error:
            return (self._write_failed(error) if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
                    else f"Cannot write to {self.dir}: {error.strerror or error}.")
        except (RuntimeError, SafetensorError) as error:  # torch's and safetensors' writers say it their way
            if not any(word in str(error) for word in ("write", "No space", "Os {", "serializ", "inline_container")):
                raise
            return self._write_failed(error)
        return None

    def _write_failed(self, error: BaseException) -> str:
        """A write that failed for lack of room: where, how much is free, and how much a state takes here."""
        try:
            where = next((p for p in [self.dir, *self.dir.parents] if p.exists()), Path("."))
            free = shutil.disk_usage(where).free
            saved = saved_progress(self.dir)
            size = sum(p.stat().st_size for p in saved[0].iterdir() if p.is_file()) if saved else 0
        except OSError:  # the disk will not even say: the failure alone
            return f"A write into {self.dir} failed ({_reason(error)}); free some space and run the same command again."
        needs = f", and a training state of this run takes {_size(size)}" if size else ""
        then = (f": it resumes from the state saved at epoch {saved[1].get('epoch')}, step {saved[1].get('step')}"
                if saved else "")
        return (f"A write into {self.dir} failed ({_reason(error)}); its disk has {_size(free)} free{needs}. Free some "
                f"space (or raise the file size limit) and run the same command again{then}.")

    def start(self) -> None:
        """Write what the run is, once its inputs have proved usable (only now is a run replaced by --overwrite
        removed); a new run starts from an empty history."""
        self.started = True
        if self.replacing:
            self.on_main(self._clear)
            self.accelerator.wait_for_everyone()
        fresh = saved_progress(self.dir) is None

        def write() -> None:
            self.dir.mkdir(parents=True, exist_ok=True)
            if fresh:
                (self.dir / METRICS_FILE).unlink(missing_ok=True)
            atomic_write_bytes(self.dir / IDENTITY_FILE, json.dumps(self.identity, indent=1).encode())
            write_toml(self.dir / CONFIG_FILE, to_dict(self.config))

        self.on_main(write)
        self.accelerator.wait_for_everyone()

    def save_state(self, ema: nn.Module | None, progress: dict[str, int]) -> None:
        """Write the state beside the last one, then swap: a kill at any moment leaves a complete state."""
        acc = self.accelerator
        tmp, final, old = self.dir / STATE_TMP, self.dir / STATE_DIR, self.dir / STATE_OLD

        def clear() -> None:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

        def finish() -> None:
            if ema is not None:
                save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, str(tmp / EMA_STATE))
            (tmp / PROGRESS_FILE).write_text(json.dumps(progress))  # written last: marks the state complete
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)

        self.on_main(clear)
        try:
            self.on_main(lambda: acc.save_state(str(tmp), safe_serialization=True), everywhere=True,
                         doing="saving the training state")
            self.on_main(finish, doing="saving the training state")
        except DistillError:
            if acc.is_main_process:  # the previous state stays whole; the partial one goes
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def resume(self, ema: nn.Module | None, global_batch: int) -> dict[str, int] | None:
        """Load the last saved state (model, optimizer, every process's RNG, EMA); its progress, or None. A state
        saved on another number of processes resumes when the global batch is the same (its images are then the
        same ones in the same order); processes it did not have start from fresh random states."""
        saved = saved_progress(self.dir)
        if saved is None:
            return None
        state, progress = saved
        saved_by, now = progress.get("processes", 1), self.accelerator.num_processes
        if saved_by != now and progress.get("global_batch") != global_batch:  # a state saved before global batches
            if self.config.overwrite:
                self.discard_state()
                return None
            raise DistillError(f"{self.dir} was saved by a run on {saved_by} process(es) that did not record its global "
                               f"batch; resume it on {saved_by}, not {now}, or pass --overwrite to start it again.")
        self.accelerator.load_state(str(state))
        # accelerate restores its micro-batch counter, which belongs to the saved run's accumulation (and is missing
        # on processes the saved run did not have); states are saved at optimizer steps, so the count starts afresh
        self.accelerator.step = 0
        if ema is not None and (state / EMA_STATE).exists():
            ema.load_state_dict(load_file(str(state / EMA_STATE), device=str(self.accelerator.device)))
        return progress

    def discard_state(self) -> None:
        """Drop the saved state (--overwrite, when this run cannot resume it): the run starts from its first step."""
        def discard() -> None:
            for name in (STATE_DIR, STATE_OLD, STATE_TMP):
                shutil.rmtree(self.dir / name, ignore_errors=True)
            (self.dir / METRICS_FILE).unlink(missing_ok=True)

        self.on_main(discard)
        self.accelerator.wait_for_everyone()

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.dir / METRICS_FILE)

    def append_metrics(self, record: dict[str, Any], keep_epochs_below: int | None = None) -> None:
        def write() -> None:
            records = self.metrics()
            if keep_epochs_below is not None:  # after a resume, drop epochs the resumed run will redo
                records = [r for r in records if r.get("epoch", 0) < keep_epochs_below]
            lines = [json.dumps(r, sort_keys=True) for r in records + [record]]
            atomic_write_bytes(self.dir / METRICS_FILE, ("\n".join(lines) + "\n").encode())

        self.on_main(write)
