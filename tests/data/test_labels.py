"""Dataset classes against model outputs (``dataset.label_map``) and subsets spread over classes
(``dataset.order``): a label that indexes another class's logit, or a subset that covers the first
few classes of a sorted ImageFolder, are wrong results that pass every other check."""

import json
import warnings
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from gig_dist.config import ConfigError
from gig_dist.data.labels import imagenet_wnids, interleave, map_labels
from gig_dist.data.sources import build_index
from gig_dist.pipeline import collect_facts
from tests.conftest import toy_config

pytestmark = pytest.mark.fast


def _folder(root, classes, per_class=2):
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40, 40), (i * 40, 80, 120)).save(root / name / f"{i}.png")
    return root


def test_imagenet_wnids_are_the_standard_sorted_list():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 == len(set(wnids)) and wnids == sorted(wnids)
    assert wnids[0] == "n01440764" and wnids[1] == "n01443537" and wnids[999] == "n15075141"


def test_folders_that_are_not_the_models_classes_warn_and_group_by_prediction(tmp_path):
    # Before: folder 0 ("car") was read as the toy model's output 0, without a word.
    root = _folder(tmp_path / "data", ["car", "cat", "dog"])
    config = toy_config("dataset.kind=imagefolder", f"dataset.path={root}")
    with pytest.warns(UserWarning, match=r"dataset's 3 classes \(car, cat, dog\) are not the model's 8 outputs"):
        facts, index, _ = collect_facts(config)
    assert index.labels.tolist() == [-1] * 6
    assert facts.label_source == "prediction" and facts.dataset_classes == ["car", "cat", "dog"]
    assert len(facts.class_names) == 8  # the model's own output names, not the folders'


def test_a_model_with_the_datasets_classes_uses_the_labels(tmp_path):
    root = _folder(tmp_path / "data", ["car", "cat", "dog"])
    config = toy_config("dataset.kind=imagefolder", f"dataset.path={root}", "model.weights=none",
                        "model.num_classes=3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        facts, index, _ = collect_facts(config)
    assert sorted(index.labels.tolist()) == [0, 0, 1, 1, 2, 2] and facts.label_source == "dataset"
    assert facts.class_names == ["car", "cat", "dog"]


def test_imagenet_wnid_folders_map_to_standard_indices(tmp_path):
    # n01440764 is tench (0), n01443537 goldfish (1), n15075141 toilet tissue (999): a dataset of
    # these three folders numbers them 0, 1, 2.
    root = _folder(tmp_path / "val", ["n01440764", "n01443537", "n15075141"], per_class=1)
    groups = np.array([0, 1, 2])
    mapped = map_labels("auto", groups, ["n01440764", "n01443537", "n15075141"], 1000, None, labelled=True)
    assert mapped.source == "imagenet" and mapped.labels.tolist() == [0, 1, 999] and mapped.warning is None
    assert mapped.class_names[0] == "tench" and mapped.class_names[999] == "toilet tissue"
    config = toy_config("dataset.kind=imagefolder", f"dataset.path={root}", "model.name=resnet18",
                        "model.weights=none", "taps=[layer4.1]")
    facts, index, _ = collect_facts(config)
    assert sorted(index.labels.tolist()) == [0, 1, 999] and facts.label_source == "imagenet"


def test_explicit_map_file(tmp_path):
    classes = ["car", "cat", "dog"]
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"car": 7, "cat": 3, "dog": 5}))
    mapped = map_labels(str(mapping), np.array([0, 1, 2, 1]), classes, 10, None, labelled=True)
    assert mapped.labels.tolist() == [7, 3, 5, 3] and mapped.source == "map"
    assert mapped.class_names[7] == "car" and mapped.class_names[0] == "0"
    lines = tmp_path / "map.txt"
    lines.write_text("car 7\ncat 3\n")
    with pytest.raises(ConfigError, match=r"does not map the classes dog"):
        map_labels(str(lines), np.array([0, 1, 2]), classes, 10, None, labelled=True)
    lines.write_text("car 7\ncat 3\ndog 12\n")
    with pytest.raises(ConfigError, match=r"outputs \{'dog': 12\} are outside the model's 0..9"):
        map_labels(str(lines), np.array([0, 1, 2]), classes, 10, None, labelled=True)
    with pytest.raises(ConfigError, match=r"not ImageNet wnids: car, cat, dog"):
        map_labels("imagenet", np.array([0, 1, 2]), classes, 1000, None, labelled=True)
    with pytest.raises(ConfigError, match=r"'nope.json': not one of auto, dataset, imagenet, prediction"):
        map_labels("nope.json", np.array([0]), classes, 10, None, labelled=True)


def test_the_run_warns_before_any_work(tmp_path, capsys):
    from gig_dist.cli import main

    root = _folder(tmp_path / "data", ["car", "cat", "dog"])
    with pytest.warns(UserWarning, match=r"dataset.label_map: the dataset's 3 classes") as caught:
        code = main(["run", "-o", "dataset.kind=imagefolder", "-o", f"dataset.path={root}", "--out",
                     str(tmp_path / "run.zarr"), "--until", "extract", "-o", "runtime.progress=false"])
    assert code == 0 and caught[0].filename.endswith("pipeline.py")  # from prepare, before any stage ran
    code = main(["inspect", str(tmp_path / "run.zarr")])
    out = capsys.readouterr().out
    assert "labels  grouped by the model's prediction: the dataset's classes are not the model's outputs" in out
    assert "  extract    6 images over " in out  # images per (predicted) class


def test_inspect_shows_images_per_class_of_each_subset(tmp_path, capsys):
    from gig_dist import pipeline
    from gig_dist.cli import main

    config = toy_config("dataset.toy.num_images=64", "gig.images=16", "decompose.images=32")
    pipeline.run(config, tmp_path / "run.zarr", until="extract")
    main(["inspect", str(tmp_path / "run.zarr")])
    out = capsys.readouterr().out
    assert "  attribute  16 images over 8 of 8 classes, 2-2 per class" in out
    assert "  decompose  32 images over 8 of 8 classes, 4-4 per class" in out


# -- subsets spread over classes (point 9) ------------------------------------------------------------


def test_interleave_takes_the_classes_in_turn():
    groups = np.array([0, 0, 0, 1, 1, 2, -1, 2, 2, 2])
    order = interleave(groups)
    assert groups[order].tolist() == [0, 1, 2, 0, 1, 2, 0, 2, 2, -1]
    assert sorted(order.tolist()) == list(range(10))


def test_a_prefix_of_a_sorted_imagefolder_covers_every_class(tmp_path):
    # Before: the first 8 of 4 classes x 6 images were all of classes 0 and 1 (ImageNet val:
    # gig.images = 5000 covered 100 of 1000 classes).
    root = _folder(tmp_path / "data", ["a", "b", "c", "d"], per_class=6)
    index = build_index(toy_config("dataset.kind=imagefolder", f"dataset.path={root}").dataset)
    assert Counter(index.labels[:8].tolist()) == {0: 2, 1: 2, 2: 2, 3: 2}
    listed = build_index(toy_config("dataset.kind=imagefolder", f"dataset.path={root}", "dataset.order=listed").dataset)
    assert Counter(listed.labels[:8].tolist()) == {0: 6, 1: 2}
    assert sorted(index.paths) == sorted(listed.paths)
    limited = build_index(toy_config("dataset.kind=imagefolder", f"dataset.path={root}", "dataset.limit=4").dataset)
    assert sorted(limited.labels.tolist()) == [0, 1, 2, 3]


def test_a_store_in_the_other_order_is_refused_naming_the_setting(tmp_path):
    from gig_dist import pipeline

    pipeline.run(toy_config("dataset.order=listed"), tmp_path / "run.zarr", until="extract")
    with pytest.raises(ConfigError, match=r"made with dataset.order = listed .*rerun with that"):
        pipeline.run(toy_config(), tmp_path / "run.zarr", until="extract")


@pytest.mark.parametrize("secret", ["root:$6$abcdefgh$S3CRET:19000:0:99999:7:::\n",
                                    '{"cat": "$6$S3CRET"}', "cat S3CRET\n"])
def test_a_label_map_that_is_not_one_is_refused_without_quoting_it(tmp_path, secret):
    """dataset.label_map=/etc/shadow printed that file's first line in its error."""
    (tmp_path / "shadow").write_text(secret)
    with pytest.raises(ConfigError) as caught:
        map_labels(str(tmp_path / "shadow"), np.zeros(2, dtype=np.int64), ["cat", "dog"], 8, None, labelled=True)
    assert "S3CRET" not in str(caught.value) and "shadow" in str(caught.value)


def test_a_label_map_that_is_a_device_is_named_as_such():
    with pytest.raises(ConfigError, match="is a character device, not a regular file"):
        map_labels("/dev/zero", np.zeros(2, dtype=np.int64), ["cat", "dog"], 8, None, labelled=True)
