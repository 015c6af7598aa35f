"""Reading the files and folders a user names or dvtrain wrote earlier, with a one-line error for each
way they can be wrong: missing, of the wrong kind (a file where a folder belongs, or the reverse),
unreadable, not UTF-8 text, not the JSON object dvtrain wrote. `what` names the path for the user
("config file", "results file"); `fix` says what to do, e.g. "pass an existing file with --config".

A file this user may not read is named as such (`unreadable`), never as damaged, and the fix offered for a
damaged file (which may be to remove it) is not offered for it: it may be another user's work (a run
directory or transfer cache shared by a group)."""

from __future__ import annotations

import json
import os
import pwd
import stat
from pathlib import Path

from dvtrain.errors import DvtrainError


class PathError(DvtrainError):
    pass


# The longest path dvtrain or W&B writes below a folder it is given (a run directory, the transfer cache):
# about 130 bytes (<cache>/examples/<data>-<hash>/ens8-resnet20-<hash>/m_di2_fgsm_cw_eps0.0313725_<hash>.safetensors,
# W&B's offline-run-*/files/media/table/...), with room to spare.
DEEPEST_BELOW = 200
# Where the file system cannot be asked (no existing folder above the path): Linux's limits.
DEFAULT_NAME_MAX, DEFAULT_PATH_MAX = 255, 4096
SHOWN = 60  # characters of an over-long path shown in a message (its start and its end)


def _shown(text: str) -> str:
    return text if len(text) <= SHOWN else f"{text[:SHOWN // 2]}…{text[-SHOWN // 2:]}"


def limits(path: str | Path) -> tuple[int, int]:
    """(NAME_MAX, PATH_MAX) in bytes of the file system that holds `path` (its nearest existing folder)."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return os.pathconf(folder, "PC_NAME_MAX"), os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError):
        return DEFAULT_NAME_MAX, DEFAULT_PATH_MAX


def check_length(path: str | Path, what: str, fix: str, below: int = 0, name_room: int = 0) -> None:
    """Raise PathError when a name in `path` is longer than the file system's NAME_MAX, or the path (plus
    `below` bytes that dvtrain writes below it) longer than PATH_MAX: checked before any work, instead of
    an OSError "File name too long" after it. `name_room`: bytes dvtrain adds to the last name (files
    derived from it). Lengths are the bytes the operating system sees (UTF-8 names count per byte)."""
    absolute = os.path.abspath(path)
    name_max, path_max = limits(absolute)
    parts = Path(absolute).parts
    for k, part in enumerate(parts):
        size = len(os.fsencode(part)) + (name_room if k == len(parts) - 1 else 0)
        if size > name_max:
            extra = f" with the {name_room} bytes dvtrain adds to it" if name_room and k == len(parts) - 1 else ""
            raise PathError(f"{what} {_shown(str(path))}: the name {_shown(part)} is {size} bytes{extra}, more than the "
                            f"{name_max} a file name may have on this file system (choose a shorter one); {fix}")
    size = len(os.fsencode(absolute)) + (below + 1 if below else 0)
    if size >= path_max:
        extra = f" with the up to {below} bytes dvtrain writes below it" if below else ""
        raise PathError(f"{what} {_shown(str(path))} is {size} bytes long{extra}, more than the {path_max - 1} a path "
                        f"may have on this file system (choose a shorter one); {fix}")


def owner(path: Path) -> str | None:
    """The name of the user owning `path` when that is not this process's user, else None."""
    try:
        uid = os.stat(path).st_uid
    except OSError:
        return None
    if uid == os.geteuid():
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def unreadable(path: Path, what: str) -> str:
    """The one line for a file or folder this user may not read (permission denied): who owns it, its mode,
    and what to do, which never removes it."""
    try:
        st = os.stat(path)
        who = owner(path) or "you"
        detail = f" (owner {who}, mode {stat.filemode(st.st_mode)})"
    except OSError:
        detail = ""
    return (f"{what} {path} cannot be read: permission denied{detail}; it is not damaged: ask its owner to make it "
            "readable (chmod g+r, or o+r), or use a copy of your own; nothing was changed")


def unlockable(path: Path, what: str, fix: str) -> str:
    """The one line for a lock file this user may not open for writing (permission denied): a cache another
    user shares read-only. Who owns it, its mode, and `fix`; nothing is changed or removed."""
    try:
        st = os.stat(path)
        detail = f" (owner {owner(path) or 'you'}, mode {stat.filemode(st.st_mode)})"
    except OSError:
        detail = f" (its folder {path.parent} is not writable for you)"
    return f"cannot take the lock {path} for {what}: permission denied{detail}; {fix}; nothing was changed"


def check_readable(path: Path, what: str) -> None:
    """Raise PathError (`unreadable`) when `path` exists but this user may not open it for reading: for
    readers whose own error hides why (safetensors 0.8 reports a permission-denied file as not found)."""
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise PathError(unreadable(path, what)) from None
    except OSError:
        pass  # missing or of the wrong kind: the reader says so


def read_text(path: Path, what: str, fix: str) -> str:
    """The UTF-8 text of the file at `path`; raises PathError (missing, a folder, unreadable, not text)."""
    path = Path(path)
    check_length(path, what, fix)
    if not path.exists():
        raise PathError(f"{what} {path} does not exist; {fix}")
    if not path.is_file():
        raise PathError(f"{what} {path} is a folder, not a file; {fix}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PathError(f"{what} {path} is not UTF-8 text (a binary or damaged file?); {fix}") from None
    except PermissionError:
        raise PathError(unreadable(path, what)) from None
    except OSError as exc:
        raise PathError(f"{what} {path} cannot be read ({exc.strerror}); {fix}") from None


def read_json_object(path: Path, what: str, fix: str) -> dict:
    """The JSON object (a dict) in the file at `path`; raises PathError as `read_text`, or when the text
    is not JSON or holds something other than an object."""
    text = read_text(path, what, fix)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PathError(f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno}); {fix}") from None
    if not isinstance(data, dict):
        raise PathError(f"{what} {path} holds a JSON {type(data).__name__}, not the object dvtrain writes; {fix}")
    return data


def check_folder(path: Path, what: str, fix: str) -> None:
    """An existing path must be a folder dvtrain can list; a missing one is fine (it is created later)."""
    path = Path(path)
    check_length(path, what, fix, below=DEEPEST_BELOW)
    if path.exists() and not path.is_dir():
        raise PathError(f"{what} {path} is a file, not a folder; {fix}")
    above = next((parent for parent in path.absolute().parents if parent.exists()), None)
    if not path.exists() and above is not None and not above.is_dir():
        raise PathError(f"{what} {path} lies inside {above}, which is a file; {fix}")
    if path.is_dir():
        try:
            next(path.iterdir(), None)
        except PermissionError:
            raise PathError(unreadable(path, what)) from None
        except OSError as exc:
            raise PathError(f"{what} {path} cannot be read ({exc.strerror}); {fix}") from None
