"""Model folders are checked when they load: types, ranges, label names, paths and modes.

Each case edits one entry of a valid ``model.json`` the way a typo or a crafted file would and
expects a ModelError that names the file (once), the key and the value, never a traceback.
"""

import json
import math
import os
import shutil

import pytest

from medseg.errors import ConfigError, ModelError
from medseg.model import SPEC_FILE, init_model, load_model, load_spec
from medseg.spec import MAX_WINDOW, LabelSpec, ModelSpec, NetworkSpec, labels_from_names

SPEC = ModelSpec(
    labels=labels_from_names(["background", "left", "right"]),
    network=NetworkSpec(out_channels=3, base_channels=4, depth=2),
    window=(32, 32),
)


@pytest.fixture
def folder(tmp_path):
    init_model(tmp_path / "m", SPEC)
    return tmp_path / "m"


def _edit(folder, **changes):
    """Rewrite model.json with ``changes``; a key "network.depth" edits inside "network",
    "labels.1.name" inside the second label."""
    path = folder / SPEC_FILE
    data = json.loads(path.read_text())
    for key, value in changes.items():
        *parents, last = key.split(".")
        target = data
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        target[int(last) if isinstance(target, list) else last] = value
    path.write_text(json.dumps(data))
    return path


def _refused(folder, *fragments):
    with pytest.raises(ModelError) as info:
        load_model(folder)
    text = str(info.value)
    spec_path = str(folder / SPEC_FILE)
    assert text.startswith(f"{spec_path}: ") and text.count(spec_path) == 1, text
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    return text


@pytest.mark.parametrize(
    ("key", "value", "fragments"),
    [
        ("spacing", [math.nan, 1.0], ["spacing", "nan"]),
        ("spacing", [math.inf, 1.0], ["spacing", "inf"]),
        ("spacing", [0, 1.0], ["spacing", "finite positive"]),
        ("spacing", [-0.5, 1.0], ["spacing", "-0.5"]),
        ("spacing", "1.0", ["spacing must be a list", "'1.0'"]),
        ("window", [160_000_000, 32], ["window must be in 1..8192, got 160000000"]),
        ("window", [32.0, 32], ["window must be an integer, got 32.0 (float)"]),
        ("window", [32], ["window must be two values"]),
        ("window", [30, 32], ["window (30, 32) must be two positive multiples of 4 (2**depth)"]),
        ("network.base_channels", "8", ["network.base_channels must be an integer, got '8' (str)"]),
        ("network.depth", True, ["network.depth must be an integer, got True (bool)"]),
        ("network.depth", -1, ["network.depth must be in 1..8, got -1"]),
        ("network.base_channels", 4096, ["network.base_channels 4096 with depth 2", "at most 4096"]),
        ("network.in_channels", 0, ["network.in_channels must be in 1..4096, got 0"]),
        ("network.name", 5, ["network.name must be a string, got 5 (int)"]),
        ("network", [], ["network must be a JSON object"]),
        ("context_slices", True, ["context_slices must be an integer, got True"]),
        ("preset", ["mr"], ["unknown preset ['mr'] (list)"]),
        ("slice_axis", "oblique", ["unknown slice_axis 'oblique'"]),
        ("format_version", "1", ["format_version must be an integer, got '1'"]),
        ("format_version", 99, ["format_version 99 is newer", "upgrade medseg"]),
        ("weights_sha256", 12, ["weights_sha256 must be 64 lower-case hex digits"]),
        ("name", "two\nlines", ["name 'two\\nlines' holds a newline"]),
        ("provenance", "trained", ["provenance must be a JSON object"]),
        ("labels", "background", ["labels must be a list"]),
        ("labels.1", ["left"], ["labels[1] must be a JSON object"]),
        ("labels.1.value", "1", ["labels[1]: label value must be an integer, got '1' (str)"]),
        ("labels.1.value", 300, ["labels[1]: label value must be in 0..255, got 300"]),
        ("labels.1.color", [1, 2], ["labels[1]: label 'left': colour must be 3 integers"]),
        ("labels.1.color", [1, 2, True], ["labels[1]: label 'left' colour must be an integer, got True"]),
        ("labels.1.name", 7, ["labels[1]: label name must be a string, got 7 (int)"]),
        ("labels.1.name", "  ", ["labels[1]: label name must not be empty"]),
        ("labels.1.name", "x" * 65, ["labels[1]: label name", "65 characters long; at most 64"]),
        ("labels.1.name", "tab\there", ["labels[1]: label name 'tab\\there' holds a newline, tab"]),
        ("labels.1.name", "nul\x00", ["labels[1]: label name 'nul\\x00'", "control character"]),
        # A newline would let the name forge header fields of the .seg.nrrd medseg writes.
        ("labels.1.name", "a\ndata file: ../secret.nii.gz", ["labels[1]: label name 'a\\ndata file: ../secret"]),
        ("weights", "/etc/passwd", ["weights '/etc/passwd' must name a file inside the model folder"]),
        ("weights", "../other/weights.safetensors", ["weights '../other/weights.safetensors'", "without '..'"]),
        ("weights", "sub/../../w.safetensors", ["without '..'"]),
        ("weights", "C:\\w.safetensors", ["must name a file inside the model folder"]),
        ("members", ["../other"], ["members entry '../other' must be a plain sub-folder name"]),
        ("members", "ab", ["members must be a list"]),
    ],
)
def test_bad_values_are_refused_naming_file_key_and_value(folder, key, value, fragments):
    _edit(folder, **{key: value})
    _refused(folder, *fragments)


def test_unknown_key_names_the_path_once(folder):
    _edit(folder, pre_set="mr")
    text = _refused(folder, "unknown key(s) ['pre_set']")
    assert "model.json: model.json" not in text
    path = folder / SPEC_FILE
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "pre_set"}))
    _edit(folder, **{"network.width": 3})
    _refused(folder, "'network': unknown key(s) ['width']")


def test_label_entries_name_missing_keys(folder):
    path = folder / SPEC_FILE
    data = json.loads(path.read_text())
    del data["labels"][2]["color"]
    path.write_text(json.dumps(data))
    _refused(folder, "labels[2]: missing key(s) ['color']")


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"labels": ' + "[" * 100_000, "[1, 2]", "\xff"])
def test_unparseable_or_deeply_nested_json_is_refused(folder, text):
    (folder / SPEC_FILE).write_text(text, encoding="latin-1")
    _refused(folder)


def test_deeply_nested_provenance_is_refused(folder):
    nested: dict = {}
    for _ in range(40):
        nested = {"a": nested}
    _edit(folder, provenance=nested)
    _refused(folder, "provenance must be a JSON object nested at most 32 levels deep")


def test_unknown_network_is_a_model_error(folder):
    _edit(folder, **{"network.name": "NoSuchNet"})
    assert load_spec(folder).network.name == "NoSuchNet"  # known to the registry only
    _refused(folder, "unknown network 'NoSuchNet'")


def test_weights_linked_from_outside_are_refused(folder, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(folder / "weights.safetensors", outside)
    (folder / "linked.safetensors").symlink_to(outside)
    _edit(folder, weights="linked.safetensors", weights_sha256=None)
    _refused(folder, "weights 'linked.safetensors' leads outside the model folder", str(outside))
    # A link that stays inside the folder is fine.
    (folder / "linked.safetensors").unlink()
    (folder / "linked.safetensors").symlink_to(folder / "weights.safetensors")
    assert load_model(folder).network is not None


def test_ensemble_member_linked_from_outside_is_refused(tmp_path):
    init_model(tmp_path / "outside", SPEC)
    init_model(tmp_path / "ens" / "a", SPEC)
    (tmp_path / "ens" / "b").symlink_to(tmp_path / "outside")
    spec = ModelSpec(labels=SPEC.labels, network=SPEC.network, window=(32, 32), members=("a", "b"))
    spec.save(tmp_path / "ens" / SPEC_FILE)
    with pytest.raises(ModelError, match="members entry 'b' leads outside the model folder"):
        load_model(tmp_path / "ens")


def test_specs_built_in_code_are_checked_too():
    with pytest.raises(ConfigError, match="label name 'a\\\\nb' holds a newline"):
        labels_from_names(["background", "a\nb"])
    with pytest.raises(ConfigError, match=f"window must be in 1..{MAX_WINDOW}"):
        ModelSpec(labels=SPEC.labels, network=SPEC.network, window=(2 * MAX_WINDOW, 32))
    with pytest.raises(ConfigError, match=r"network\.depth must be an integer"):
        NetworkSpec(depth=True)
    with pytest.raises(ConfigError, match="label value must be an integer"):
        LabelSpec(True, "yes", (1, 2, 3))


def test_valid_folder_loads_and_round_trips(folder):
    spec = load_model(folder).spec
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_saved_files_are_readable_as_the_umask_allows(tmp_path, umask, mode):
    # safetensors creates files 0600: a model another user or service reads must not be.
    old = os.umask(umask)
    try:
        init_model(tmp_path / "m", SPEC)
    finally:
        os.umask(old)
    for name in ("weights.safetensors", SPEC_FILE):
        assert (tmp_path / "m" / name).stat().st_mode & 0o777 == mode, name


def test_label_names_that_share_a_file_name_are_refused():
    from medseg.errors import ConfigError
    from medseg.spec import LabelSpec, ModelSpec, NetworkSpec

    labels = (LabelSpec(0, "background", (0, 0, 0)), LabelSpec(1, "a b", (1, 2, 3)), LabelSpec(2, "a_b", (4, 5, 6)))
    with pytest.raises(ConfigError, match="become the same file name"):
        ModelSpec(labels=labels, network=NetworkSpec(out_channels=3, base_channels=4))


def test_an_ensemble_is_not_written_inside_a_member(tmp_path, tiny_model_dir):
    import shutil

    from medseg.errors import ModelError
    from medseg.model import build_ensemble

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_model_dir, a)
    shutil.copytree(tiny_model_dir, b)
    with pytest.raises(ModelError, match="lies inside the member folder"):
        build_ensemble({"a": a, "b": b}, a / "inner")
    assert not (a / "inner").exists()
