"""Extracts a ComfyUI source tree from a git directory (e.g. a mirror fetched without a
work tree) into a folder, leaving out its tests and any blob the mirror does not hold."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile


def git(git_dir, *args, env=None, capture=True):
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], check=True, env=env,
                          capture_output=capture, text=True).stdout


def main(git_dir: str, dest: str, rev: str = "HEAD") -> None:
    entries = [line.split("\t", 1) for line in git(git_dir, "ls-tree", "-r", rev).splitlines()]
    blobs = "\n".join(meta.split()[2] for meta, _ in entries) + "\n"
    check = subprocess.run(["git", f"--git-dir={git_dir}", "cat-file", "--batch-check"], input=blobs,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    missing = {line.split()[0] for line in check if line.endswith("missing")}
    leave_out = [path for meta, path in entries
                 if meta.split()[2] in missing or path.startswith(("tests/", "tests-unit/"))]
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, GIT_INDEX_FILE=os.path.join(tmp, "index"))
        git(git_dir, "read-tree", rev, env=env)
        for i in range(0, len(leave_out), 200):
            git(git_dir, "update-index", "--force-remove", "--", *leave_out[i:i + 200], env=env)
        git(git_dir, "checkout-index", "-a", f"--prefix={os.path.abspath(dest)}/", env=env)
    print(f"extracted {rev} into {dest}; left out {len(leave_out)} files (tests, blobs not in the mirror)")


if __name__ == "__main__":
    main(*sys.argv[1:])
