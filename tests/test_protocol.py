"""The head protocol's shared parts (featcache/heads/protocol.py) on a tiny head that stores one array:
options checked once, the typed record, atomic saves, loading refuses damaged or foreign records and
files, class weights as scikit-learn defines them. No training, no TensorFlow."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from featcache import FeatcacheError
from featcache.heads.protocol import (
    FIT_RECIPE,
    RECORD,
    RECORD_FORMAT,
    FitOptions,
    Head,
    HeadRecord,
    check_files,
    class_weight_of,
    read_record,
    two_columns,
)


class TinyHead(Head):
    """A head whose model is one probability table row per class; enough for the protocol."""

    kind = "tiny"

    def __init__(self, name, options=None, table=None):
        super().__init__(name, *([options] if options else []))  # the base's default when not given
        self.table = table

    def predict_proba(self, features):
        return np.asarray(features, np.float64) @ self.table

    def _write(self, folder):
        np.save(folder / "table.npy", self.table)
        return ["table.npy"]


def tiny(name="tiny", **record) -> TinyHead:
    head = TinyHead(name, FitOptions(epochs=3, seed=5), np.array([[0.8, 0.2], [0.1, 0.9]]))
    head.record.update(cache_key="k" * 64, classes=["cat", "dog"], feature_shape=[2], metrics={"acc": 1.0}, **record)
    return head


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- options -----------------------------------------------------------------------------------------

def test_default_options_are_adam_1e3_with_early_stopping_and_auto_scaling():
    options = FitOptions()
    assert options.to_json() == {"epochs": 50, "batch_size": 20, "learning_rate": 1e-3, "optimizer": "adam",
                                 "seed": 0, "class_weight": None, "patience": 10, "scaling": "auto",
                                 "precision": "auto"}


@pytest.mark.parametrize(("option", "change", "message"), [
    ("optimizer", {"optimizer": "adagrad"}, "--optimizer 'adagrad': choose one of adam, rmsprop, sgd"),
    ("scaling", {"scaling": "minmax"}, "--scaling 'minmax': choose one of auto, standard, l2, none, rms"),
    ("class_weight", {"class_weight": "weighted"}, "--class-weight 'weighted': choose one of balanced"),
    ("precision", {"precision": "bfloat16"},
     "--precision 'bfloat16': choose one of auto, float32, mixed_bfloat16, mixed_float16"),
])
def test_an_option_outside_its_choices_is_refused_naming_them(option, change, message):
    with pytest.raises(FeatcacheError) as refusal:
        FitOptions(**change)
    assert str(refusal.value) == message


@pytest.mark.parametrize("change", [{"epochs": 0}, {"batch_size": 0}, {"learning_rate": 0.0},
                                    {"learning_rate": -1e-3}, {"learning_rate": float("nan")}])
def test_nonpositive_epochs_batch_size_or_learning_rate_are_refused_in_one_line(change):
    with pytest.raises(FeatcacheError) as refusal:
        FitOptions(**change)
    options = {"epochs": 50, "batch_size": 20, "learning_rate": 1e-3, **change}
    assert str(refusal.value) == (f"epochs {options['epochs']}, batch size {options['batch_size']} and learning "
                                  f"rate {options['learning_rate']} must all be positive")


def test_the_smallest_valid_options_and_every_allowed_choice_are_accepted():
    FitOptions(epochs=1, batch_size=1, learning_rate=1e-9)
    for optimizer in ("adam", "rmsprop"):
        for scaling in ("auto", "standard", "l2", "none", "rms"):
            for class_weight in (None, "balanced"):
                FitOptions(optimizer=optimizer, scaling=scaling, class_weight=class_weight)


def test_options_round_trip_through_json_ignoring_fields_they_do_not_know():
    options = FitOptions(epochs=7, batch_size=3, learning_rate=0.5, optimizer="rmsprop", seed=9,
                         class_weight="balanced", patience=None, scaling="l2")
    assert FitOptions.from_json({**options.to_json(), "dropout": 0.5}) == options
    assert options.pinned(epochs=2, scaling="none") == FitOptions(
        epochs=2, batch_size=3, learning_rate=0.5, optimizer="rmsprop", seed=9, class_weight="balanced",
        patience=None, scaling="none")
    with pytest.raises(FeatcacheError):
        options.pinned(optimizer="adagrad")  # pinned options are checked too


# --- the record ---------------------------------------------------------------------------------------

def record_json(**changes) -> dict:
    data = {"format": RECORD_FORMAT, "name": "logreg", "kind": "linear", "cache_key": "c" * 64,
            "classes": ["a", "b"], "feature_shape": [2, 2, 8], "options": FitOptions().to_json(),
            "files": {"model.npz": "f" * 64}, "metrics": {"test": {"accuracy": 0.5}}, "fit_recipe": FIT_RECIPE}
    return {**data, **changes}


def test_a_record_reads_its_fields_typed_and_keeps_the_rest_as_details():
    record = HeadRecord.from_json(record_json(), Path("h/head.json"))
    assert record == HeadRecord("logreg", "linear", "c" * 64, ("a", "b"), (2, 2, 8), FitOptions(),
                                {"model.npz": "f" * 64},
                                details={"metrics": {"test": {"accuracy": 0.5}}, "fit_recipe": FIT_RECIPE})
    assert record.format == RECORD_FORMAT == 1
    assert record.to_json() == record_json()
    assert list(record.to_json())[:3] == ["metrics", "fit_recipe", "format"]  # fixed fields win over details


def test_record_fields_are_converted_to_their_types():
    record = HeadRecord.from_json(record_json(name=5, classes=[1, 2], feature_shape=["4"]), Path("head.json"))
    assert (record.name, record.classes, record.feature_shape) == ("5", ("1", "2"), (4,))


@pytest.mark.parametrize(("changes", "message"), [
    ({"format": 2}, "h/head.json: head record format 2, not 1 (saved by another featcache version); "
                    "fit it again with `featcache fit-head --head logreg --refit`"),
    ({"format": None}, "h/head.json: head record format None, not 1"),
    ({"classes": 3}, "h/head.json: not a valid head record ("),
    ({"feature_shape": ["x"]}, "h/head.json: not a valid head record ("),
    ({"options": {"optimizer": "adagrad"}}, "h/head.json: not a valid head record (--optimizer 'adagrad'"),
    ({"files": [1]}, "h/head.json: not a valid head record ("),
    ({"files": {"model.npz": 5}}, "h/head.json: the record's files are not names with their sha256; "
                                  "fit it again with `featcache fit-head --head logreg --refit`"),
    ({"files": {5: "f"}}, "h/head.json: the record's files are not names with their sha256"),
])
def test_a_malformed_record_is_refused_in_one_line_naming_the_file_and_the_fix(changes, message):
    with pytest.raises(FeatcacheError) as refusal:
        HeadRecord.from_json(record_json(**changes), Path("h/head.json"))
    text = str(refusal.value)
    assert text.startswith(message) and "\n" not in text
    assert text.endswith("fit it again with `featcache fit-head --head logreg --refit`")


@pytest.mark.parametrize("missing", ["name", "kind", "cache_key", "classes", "feature_shape", "options", "files"])
def test_a_record_missing_a_field_is_refused_naming_it(missing):
    data = record_json()
    del data[missing]
    with pytest.raises(FeatcacheError, match=f"not a valid head record \\('{missing}'\\)") as refusal:
        HeadRecord.from_json(data, Path("saved/head.json"))
    fixed_name = "saved" if missing == "name" else "logreg"  # without a name, the folder's
    assert str(refusal.value).endswith(f"`featcache fit-head --head {fixed_name} --refit`")


def test_a_nameless_record_given_by_its_folder_names_that_folder():
    data = record_json(format=0)
    del data["name"]
    with pytest.raises(FeatcacheError) as refusal:
        HeadRecord.from_json(data, Path("heads/svm"))
    assert str(refusal.value).endswith("`featcache fit-head --head svm --refit`")


# --- the base head ------------------------------------------------------------------------------------

def test_a_new_head_holds_its_name_and_options_and_an_empty_record():
    options = FitOptions(epochs=4)
    head = TinyHead("mine", options)
    assert (head.name, head.options, head.record) == ("mine", options, {})
    assert TinyHead("x").options == FitOptions()
    restored = TinyHead.restore("again", options, {"kind": "tiny"})
    assert type(restored) is TinyHead and (restored.name, restored.options, restored.record) == ("again", options, {})
    assert Head.streams and Head.refittable and Head.kind == ""


def test_predict_is_the_most_probable_class_and_n_classes_counts_the_records_classes():
    head = tiny()
    assert head.n_classes == 2
    assert head.predict(np.array([[1.0, 0.0], [0.0, 1.0], [0.2, 0.8], [0.9, 0.1]])).tolist() == [0, 1, 1, 0]


class FakeCache:
    def __init__(self, key):
        self.key = key


def test_a_head_accepts_its_own_cache_and_refuses_another_naming_both_and_the_fix():
    head = tiny()
    head.check_cache(FakeCache("k" * 64))
    with pytest.raises(FeatcacheError) as refusal:
        head.check_cache(FakeCache("0123456789abcdef" + "0" * 48))
    assert str(refusal.value) == ("head tiny was fitted on cache kkkkkkkkkkkkkkkk, not 0123456789abcdef; fit it again "
                                  "with `featcache fit-head --head tiny --cache 0123456789abcdef`")
    with pytest.raises(FeatcacheError, match="fitted on cache None, not"):
        TinyHead("fresh").check_cache(FakeCache("k" * 64))


def test_the_default_stream_plan_is_the_sgd_plan(monkeypatch):
    from featcache import streaming

    monkeypatch.setattr(streaming, "sgd_plan", lambda cache, budget: ("sgd", cache, budget))
    assert tiny().stream_plan("the cache", 123) == ("sgd", "the cache", 123)


def test_what_subclasses_implement_raises_not_implemented_on_the_base():
    head = Head("base")
    for call in (lambda: head.fit(None, None, n_classes=2), lambda: head.fit_streamed(None, None),
                 lambda: head.predict_proba(None), lambda: head.to_keras((2,)), head.for_fold,
                 lambda: head._write(Path(".")), lambda: head._read(Path("."))):
        with pytest.raises(NotImplementedError):
            call()


# --- saving and reading back --------------------------------------------------------------------------

def test_save_writes_the_files_with_their_sha256_and_the_typed_record(tmp_path):
    head = tiny()
    folder = head.save(tmp_path / "heads" / "tiny")
    assert folder == tmp_path / "heads" / "tiny"
    assert sorted(p.name for p in folder.iterdir()) == [RECORD, "table.npy"]
    written = json.loads((folder / RECORD).read_text())
    assert written == {"metrics": {"acc": 1.0}, "format": RECORD_FORMAT, "name": "tiny", "kind": "tiny",
                       "cache_key": "k" * 64, "classes": ["cat", "dog"], "feature_shape": [2],
                       "options": FitOptions(epochs=3, seed=5).to_json(),
                       "files": {"table.npy": sha(folder / "table.npy")}}
    assert (folder / RECORD).read_text().startswith('{\n  "metrics"')  # indented, for people to read
    assert head.record["files"] == written["files"] and head.record["kind"] == "tiny"
    assert read_record(folder) == written
    check_files(folder, written)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tiny"]  # no temporary or old folder left


def test_saving_again_replaces_the_folder_whole(tmp_path):
    folder = tmp_path / "tiny"
    tiny().save(folder)
    (folder / "stale.txt").write_text("from before")
    head = tiny()
    head.table = np.eye(2)
    head.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == [RECORD, "table.npy"]
    np.testing.assert_array_equal(np.load(folder / "table.npy"), np.eye(2))
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_save_over_leftovers_of_an_interrupted_save_of_this_process(tmp_path):
    leftover = tmp_path / f".tiny.tmp-{os.getpid()}"
    leftover.mkdir()
    (leftover / "junk").write_text("half written")
    tiny().save(tmp_path / "tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


class FailingHead(TinyHead):
    def __init__(self, exc):
        super().__init__("failing", table=np.eye(2))
        self.exc = exc
        self.record.update(cache_key="k", classes=["a", "b"], feature_shape=[2])

    def _write(self, folder):
        np.save(folder / "table.npy", self.table)
        raise self.exc


@pytest.mark.parametrize("exc", [OSError(errno.EIO, "I/O error"), KeyboardInterrupt()])
def test_a_failed_save_leaves_the_saved_head_and_no_temporary(exc, tmp_path):
    folder = tiny().save(tmp_path / "failing")
    before = (folder / RECORD).read_text()
    with pytest.raises(type(exc)):
        FailingHead(exc).save(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["failing"]
    assert (folder / RECORD).read_text() == before


def test_a_save_that_fills_the_disk_is_one_line_naming_the_head_and_folder(tmp_path):
    with pytest.raises(FeatcacheError) as refusal:
        FailingHead(OSError(errno.ENOSPC, "No space left on device")).save(tmp_path / "h")
    assert str(refusal.value).startswith(f"saving head failing to {tmp_path / 'h'}: No space left on device; ")
    assert list(tmp_path.iterdir()) == []


def test_a_record_save_would_not_read_back_is_never_written(tmp_path):
    head = tiny()
    head.record["classes"] = 3  # load would refuse it
    with pytest.raises(FeatcacheError, match="not a valid head record"):
        head.save(tmp_path / "tiny")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("content", "message"), [
    (None, "not a saved head"),
    ("{not json", "not a saved head"),
    ("[1, 2]", "head.json: not a head record; fit the head again with `featcache fit-head`"),
    (json.dumps({"format": 1}), "head.json: not a valid head record"),
])
def test_read_record_refuses_what_is_not_a_saved_head(content, message, tmp_path):
    if content is not None:
        (tmp_path / RECORD).write_text(content)
    with pytest.raises(FeatcacheError, match=message) as refusal:
        read_record(tmp_path)
    assert str(refusal.value).startswith(str(tmp_path)) and "\n" not in str(refusal.value)
    if content is None or content.startswith("{not"):
        assert str(refusal.value).endswith("; fit it with `featcache fit-head`")


@pytest.mark.parametrize("files", [None, {}, ["table.npy"]])
def test_a_record_without_files_is_an_older_featcaches_head(files, tmp_path):
    with pytest.raises(FeatcacheError) as refusal:
        check_files(tmp_path, {"name": "svm", "fit_recipe": 2, "files": files})
    assert str(refusal.value) == (f"{tmp_path}: a head saved by an older featcache (recipe 2); "
                                  "fit it again with `featcache fit-head --head svm --refit`")


@pytest.mark.parametrize("damage", ["missing", "changed", "outside", "folder"])
def test_a_missing_changed_or_outside_file_is_refused(damage, tmp_path):
    folder = tiny().save(tmp_path / "tiny")
    record = read_record(folder)
    files = dict(record["files"])
    if damage == "missing":
        (folder / "table.npy").unlink()
    elif damage == "changed":
        (folder / "table.npy").write_bytes((folder / "table.npy").read_bytes() + b"\0")
    elif damage == "outside":  # a name that leaves the folder, even with the right hash
        (tmp_path / "other.npy").write_bytes((folder / "table.npy").read_bytes())
        files = {"../other.npy": files["table.npy"]}
    else:
        (folder / "sub").mkdir()
        files = {"sub": files["table.npy"]}
    with pytest.raises(FeatcacheError) as refusal:
        check_files(folder, {**record, "files": files})
    name = next(iter(files))
    assert str(refusal.value) == (
        f"{folder / name} is missing or does not match the sha256 recorded when it was saved; refusing to "
        "load it (fit the head again with `featcache fit-head --head tiny --refit`)")


def test_a_refusal_without_a_name_in_the_record_names_the_folder(tmp_path):
    with pytest.raises(FeatcacheError, match="--head myhead --refit"):
        check_files(tmp_path / "myhead", {"files": {"gone.npy": "0" * 64}})
    with pytest.raises(FeatcacheError, match="--head myhead --refit"):
        check_files(tmp_path / "myhead", {})


# --- helpers ------------------------------------------------------------------------------------------

def test_balanced_class_weights_are_n_over_k_times_class_count_as_in_scikit_learn():
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2])
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    weights = class_weight_of(labels, 3, "balanced")
    assert list(weights) == [0, 1, 2] and all(type(w) is float for w in weights.values())
    np.testing.assert_allclose([weights[i] for i in range(3)], expected, rtol=1e-12)
    assert class_weight_of(labels, 3, None) is None


def test_a_class_without_rows_weighs_as_if_it_had_one():
    weights = class_weight_of(np.array([0.0, 0.0, 2.0]), 4, "balanced")
    assert weights == {0: 3 / 8, 1: 3 / 4, 2: 3 / 4, 3: 3 / 4}


def test_two_columns_from_one_sigmoid_column_in_float64():
    p = two_columns(np.array([[0.25], [1.0], [0.0]], np.float32))
    assert p.dtype == np.float64 and p.shape == (3, 2)
    np.testing.assert_array_equal(p, [[0.75, 0.25], [0.0, 1.0], [1.0, 0.0]])
    np.testing.assert_array_equal(two_columns([0.5]), [[0.5, 0.5]])
