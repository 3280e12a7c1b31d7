"""Model files named in a node's input, resolved inside ComfyUI's model folders only.

A name comes from the browser (or an API prompt anyone on the network can send): an
absolute path, a `..` or a symlink must not make a node read a file elsewhere on the
machine. ComfyUI's folder_paths finds the file; this refuses names that try to leave the
folders and files whose real location (symlinks followed) lies outside every folder
configured for the kind, extra_model_paths.yaml included.
"""
from __future__ import annotations

import os

import folder_paths

from ..backends.engine.errors import QuantKitError


def escapes(name: str) -> bool:
    """An absolute name, a drive letter or a `..` part."""
    parts = name.replace("\\", "/").split("/")
    return os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":")


def model_file(folder_name: str, name: str) -> str:
    """The real path of `name` in the folders ComfyUI lists for folder_name."""
    if escapes(name):
        raise QuantKitError(f"'{name}' is not a file name inside ComfyUI's model folders: choose "
                            f"a file from the node's list (a relative name without '..').")
    path = folder_paths.get_full_path_or_raise(folder_name, name)
    real = os.path.realpath(path)
    roots = [os.path.realpath(p) for p in folder_paths.get_folder_paths(folder_name)]
    if not any(os.path.commonpath([root, real]) == root for root in roots):
        raise QuantKitError(f"{path} leads to {real}, outside ComfyUI's model folders for it "
                            f"({', '.join(roots)}): QuantKit reads only files inside them. Move "
                            f"the file into one of them, or add its folder to "
                            f"extra_model_paths.yaml.")
    return real
