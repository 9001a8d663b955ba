"""A server of artifact writers for the kill -9 tests: each save runs in a process of its own, forked from this one.

    python artifact_writer.py        then, one command a line on stdin:

    save TAG SOURCE TARGET SHARD_BYTES pause|run    fork a writer that saves the artifact in SOURCE over TARGET;
                                                     answers "started TAG PID"
    go TAG                                           let a paused writer take its next step
    reap TAG                                         wait for the writer to end; answers "exit TAG STATUS"
                                                     (STATUS: exit code, or -signal)
    quit

A writer prints ``step TAG <operation> <from> <to>`` before every rename and every folder removal and, with ``pause``,
waits there for ``go``: a test kills it with SIGKILL at the step it chooses, so nothing runs after that point, not
even clean-up. It prints ``done TAG`` when the save finished, ``busy TAG`` (status 3) if another process is saving to
TARGET. The server imports only what a save needs (not transformers: the package's ``__init__``, which registers the
pipeline, is bypassed) once; every writer then starts in milliseconds.
"""

import os
import re
import shutil
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "hf_fwdattr"
package = types.ModuleType("hf_fwdattr")
package.__path__ = [str(ROOT)]
package.__version__ = re.search(r'__version__ = "([^"]+)"', (ROOT / "__init__.py").read_text()).group(1)
sys.modules["hf_fwdattr"] = package

import huggingface_hub  # noqa: E402,F401  (the model card, imported before forking)
from hf_fwdattr.errors import ArtifactBusyError  # noqa: E402
from hf_fwdattr.storage.artifact import InfluenceArtifact  # noqa: E402

RENAME, REPLACE, RMTREE = os.rename, os.replace, shutil.rmtree


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def writer(tag: str, source: str, target: str, shard_bytes: int, pause: bool, go: int) -> int:
    def announced(operation, original):
        def step(*args, **kwargs):
            say(f"step {tag} {operation} " + " ".join(Path(str(a)).name for a in args[:2]))
            if pause and os.read(go, 1) != b"g":
                os._exit(2)
            return original(*args, **kwargs)

        return step

    os.rename, os.replace, shutil.rmtree = announced("rename", RENAME), announced("replace", REPLACE), announced("rmtree", RMTREE)
    artifact = InfluenceArtifact.from_pretrained(source)
    try:
        artifact.save_pretrained(target, max_shard_size=shard_bytes)
    except ArtifactBusyError:
        say(f"busy {tag}")
        return 3
    say(f"done {tag}")
    return 0


def main() -> None:
    children: dict[str, tuple[int, int]] = {}  # tag -> (pid, write end of its go pipe)
    for line in sys.stdin:
        command = line.split()
        if not command:
            continue
        if command[0] == "save":
            tag, source, target, shard_bytes, mode = command[1:]
            read_go, write_go = os.pipe()
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                os.close(write_go)
                for _, other in children.values():
                    os.close(other)
                try:
                    status = writer(tag, source, target, int(shard_bytes), mode == "pause", read_go)
                except BaseException as err:  # noqa: BLE001  (reported to the test, which fails)
                    say(f"error {tag} {err!r}")
                    status = 1
                os._exit(status)
            os.close(read_go)
            children[tag] = (pid, write_go)
            say(f"started {tag} {pid}")
        elif command[0] == "go":
            os.write(children[command[1]][1], b"g")
        elif command[0] == "reap":
            pid, write_go = children.pop(command[1])
            os.close(write_go)
            _, status = os.waitpid(pid, 0)
            say(f"exit {command[1]} {os.waitstatus_to_exitcode(status)}")
        elif command[0] == "quit":
            break


if __name__ == "__main__":
    main()
