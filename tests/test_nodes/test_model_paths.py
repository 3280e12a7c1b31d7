"""Only files inside ComfyUI's model folders are read or written, through real ComfyUI:
Load GGUF Model and Load GGUF CLIP refuse absolute names, `..` and symlinks whose target
lies outside the folders (a symlink inside them still works); Save Quantized Model
refuses symlinked files and folders that lead outside. How each test was shown able to
fail is in its docstring.
"""
from __future__ import annotations

import os

import pytest

from conftest import pack_module
from harness import gguf_bytes as gb

errors = pack_module("backends.engine.errors")

# a well-formed file that is not a model: reading it gets as far as ComfyUI's detection
TINY = gb.encode(gb.valid_spec([("w", "F32", (4,))]))


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    folder = tmp_path_factory.mktemp("outside-the-models")
    for name in ("secret.gguf", "secret.safetensors"):
        (folder / name).write_bytes(TINY)
    return folder


@pytest.fixture(scope="module")
def folders(comfy, base_dir, outside):
    made = {}
    for kind, ext in (("diffusion_models", ".gguf"), ("text_encoders", ".gguf")):
        folder = base_dir / "models" / kind
        folder.mkdir(parents=True, exist_ok=True)
        for name, target in ((f"qk_link_out{ext}", outside / f"secret{ext}"),
                             ("qk_dir_out", outside)):
            if not (folder / name).is_symlink():
                os.symlink(target, folder / name)
        (folder / f"qk_real{ext}").write_bytes(TINY)
        if not (folder / f"qk_link_in{ext}").is_symlink():
            os.symlink(folder / f"qk_real{ext}", folder / f"qk_link_in{ext}")
        made[kind] = folder
    (made["text_encoders"] / "qk_link_out.safetensors").unlink(missing_ok=True)
    os.symlink(outside / "secret.safetensors", made["text_encoders"] / "qk_link_out.safetensors")
    (base_dir / "models" / "qk_one_up.gguf").write_bytes(TINY)
    yield made
    for folder in made.values():
        for p in folder.iterdir():
            if p.name.startswith("qk_"):
                p.unlink()
    (base_dir / "models" / "qk_one_up.gguf").unlink()


def load_model(comfy, name):
    node = comfy.NODE_CLASS_MAPPINGS["QuantKitLoadGGUF"]
    node.INPUT_TYPES()  # registers the node's folder, as the UI does
    return node().load(name)


def load_clip(comfy, name):
    node = comfy.NODE_CLASS_MAPPINGS["QuantKitLoadGGUFCLIP"]
    node.INPUT_TYPES()
    return node().load(name, "pixart")


LOADERS = {"model": load_model, "clip": load_clip}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("name", ["qk_link_out.gguf", "qk_dir_out/secret.gguf"],
                         ids=["file-symlink", "folder-symlink"])
def test_loaders_refuse_symlinks_leading_outside(comfy, folders, loader, name):
    """Shown able to fail: without the realpath check in model_file, both loaders read the
    outside file (and failed later, with the reader's or ComfyUI's errors about it)."""
    with pytest.raises(errors.QuantKitError, match="outside ComfyUI's model folders"):
        LOADERS[loader](comfy, name)


def test_clip_loader_refuses_a_safetensors_symlink_leading_outside(comfy, folders):
    """Shown able to fail: as above (the outside .safetensors file was read, and called
    not a valid .safetensors file)."""
    with pytest.raises(errors.QuantKitError, match="outside ComfyUI's model folders"):
        load_clip(comfy, "qk_link_out.safetensors")


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("name", ["../qk_one_up.gguf", "{outside}/secret.gguf",
                                  "sub/../../qk_one_up.gguf", "C:/secret.gguf"],
                         ids=["dotdot", "absolute", "nested-dotdot", "drive"])
def test_loaders_refuse_names_leaving_the_folders(comfy, folders, outside, loader, name):
    """Shown able to fail: without the `escapes(name)` check, ComfyUI's folder_paths turned
    '../qk_one_up.gguf' into 'qk_one_up.gguf' and the absolute name into a relative one,
    so the loaders said 'not found' (FileNotFoundError), not that the name leaves the folder."""
    with pytest.raises(errors.QuantKitError, match="not a file name inside ComfyUI's model folders"):
        LOADERS[loader](comfy, name.format(outside=outside))


@pytest.mark.parametrize("loader", LOADERS)
def test_a_symlink_inside_the_folders_still_loads(comfy, folders, loader):
    """A symlink to a file inside the folders is followed: the file is read (and, being no
    model, refused by the reader or by ComfyUI's detection). Shown able to fail: refusing
    every symlink (os.path.islink in model_file) made this a path error."""
    with pytest.raises(Exception) as info:
        LOADERS[loader](comfy, "qk_link_in.gguf")
    assert "model folders" not in str(info.value), info.value


@pytest.mark.parametrize("kind", ["diffusion_models", "text_encoders"])
@pytest.mark.parametrize("name", ["qk_link_out", "qk_dir_out/new"])
def test_save_refuses_symlinks_leading_outside(comfy, folders, outside, name, kind):
    """Save Quantized Model's targets (the model in diffusion_models, each text encoder in
    text_encoders): a symlinked file or folder leading outside is refused and the outside
    file is untouched, even with overwrite on. Shown able to fail: with os.path.abspath
    instead of os.path.realpath in output_path, both names were accepted in both folders."""
    before = (outside / "secret.gguf").read_bytes()
    with pytest.raises(errors.QuantKitError, match="leads outside"):
        pack_module("nodes.save_quantized_model").output_path(name, overwrite=True, kind=kind)
    assert (outside / "secret.gguf").read_bytes() == before
    assert not (outside / "new.gguf").exists()
