"""What every preset of the paper's tables trains on: the data's augmentation and normalisation
(docs/method.md, "The presets", written out here) and the authors' settings where their code fixes a detail.

Each dataset is read from tiny files in the real on-disk formats (the writers of test_data.py and
test_datasets.py), with the preset's augmentation name, exactly as a run loads it."""

import dataclasses
import json

import pytest
import torch

import lls
from lls.data import DATASETS, dataset_shape
from lls.data.base import Augment
from lls.step.factory import build_trainer
from lls.training.presets import PRESETS, select

from .test_data import write_tiny_idx_set
from .test_datasets import write_cifar10, write_image

CIFAR = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# (dataset, augmentation name of the preset; None: the dataset's default) ->
# (augment, (mean, std), (image side, train resize, random train crop)); resize/crop: file sets only
EXPECTED = {
    ("mnist", None): (Augment(crop_padding=4), ((0.5,), (0.5,)), (28, None, None)),
    ("fashion-mnist", None): (Augment(crop_padding=4, hflip=True), ((0.286,), (0.353,)), (28, None, None)),
    ("cifar10", "basic"): (Augment(hflip=True), CIFAR, (32, None, None)),
    ("cifar10", "aug"): (Augment(crop_padding=4, hflip=True, erasing=0.2), CIFAR, (32, None, None)),
    ("cifar100", "basic"): (Augment(hflip=True), CIFAR, (32, None, None)),
    ("cifar100", "aug"): (Augment(crop_padding=4, hflip=True, erasing=0.2), CIFAR, (32, None, None)),
    # 160 px Imagenette: resize 160, random crop 128, flip, erasing 0.2 (test: resize 160, centre crop)
    ("imagenette", "aug"): (Augment(hflip=True, erasing=0.2), IMAGENET, (128, 160, True)),
    # the authors' "basic" Imagenette (SmallConv rows): resize 132, random crop 128, flip
    ("imagenette", "basic"): (Augment(hflip=True), IMAGENET, (128, 132, True)),
    ("tinyimagenet", "aug"): (Augment(hflip=True, erasing=0.2), IMAGENET, (64, None, False)),
    # VWW: resize 132, random crop 128, flip; test centre crop
    ("vww", None): (Augment(hflip=True), IMAGENET, (128, 132, True)),
}


def write_dataset(name: str, root):
    """Tiny files of ``name`` under ``root``; returns the registered source, its counts relaxed."""
    source = DATASETS.get(name)
    if name in ("mnist", "fashion-mnist"):
        write_tiny_idx_set(root)
        return dataclasses.replace(source, counts=None, content_sha256={}, system_dirs=())
    if name == "cifar10":
        write_cifar10(root / "cifar-10-batches-bin")
        return dataclasses.replace(source, counts={})
    if name == "cifar100":
        folder = root / "cifar-100-binary"
        folder.mkdir()
        record = bytes([0, 3]) + bytes(3072)
        (folder / "train.bin").write_bytes(record * 2)
        (folder / "test.bin").write_bytes(record)
        return dataclasses.replace(source, counts={})
    if name == "imagenette":
        for split in ("train", "val"):
            for i in range(10):
                write_image(root / "imagenette2-160" / split / f"n0{i}" / "a.JPEG", (213, 160), (5, 5, 5))
        return dataclasses.replace(source, counts=None)
    if name == "tinyimagenet":
        base = root / "tiny-imagenet-200"
        base.mkdir()
        (base / "wnids.txt").write_text("n01\nn02\n")
        for w in ("n01", "n02"):
            write_image(base / "train" / w / "images" / f"{w}_0.JPEG", (64, 64), (1, 1, 1))
        write_image(base / "val" / "images" / "val_0.JPEG", (64, 64), (2, 2, 2))
        (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t63\t63\n")
        return dataclasses.replace(source, counts=None)
    if name == "vww":
        write_image(root / "all2014" / "a.jpg", (150, 140), (9, 9, 9))
        (root / "annotations").mkdir()
        content = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}
        for split in ("train", "val"):
            (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
        return source
    raise AssertionError(f"no tiny files for {name}")


def test_every_preset_data_setting_is_written_out():
    assert {(p.dataset, p.augment) for p in PRESETS} == set(EXPECTED)


@pytest.mark.parametrize("dataset,augment", sorted(EXPECTED, key=str), ids=str)
def test_preset_augmentation_and_normalisation(tmp_path, dataset, augment):
    expected_augment, (mean, std), (side, resize, random_crop) = EXPECTED[(dataset, augment)]
    preset = next(p for p in PRESETS if (p.dataset, p.augment) == (dataset, augment))
    config = preset.config(seed=0)
    data = write_dataset(dataset, tmp_path).load(tmp_path, download=False, augment=config.augment)
    assert data.augment == expected_augment
    assert data.mean == pytest.approx(mean) and data.std == pytest.approx(std)
    assert data.input_shape[1:] == (side, side)
    if resize is not None or random_crop is not None:  # streamed image files
        assert (data.train.resize, data.train.random_crop) == (resize, random_crop)
        assert (data.test.resize, data.test.random_crop) == (resize, False)  # centre crop to test


def test_vgg8_random_bases_and_local_classifiers_are_pooled_from_2048():
    """The authors' VGG8 draws its random bases and local classifiers at K x 2048 and pools them to
    d_l; their SmallConv(L) draws them at d_l, the default."""
    for preset in PRESETS:
        wide = preset.rule == "local-classifier" or preset.rule_options.get("basis") == "random"
        expected = 2048 if wide and preset.model == "vgg8" else None
        assert preset.rule_options.get("readout_width") == expected, preset.name
    row = select("table3", "cifar100", "vgg8", "local-classifier")[0].config(seed=0)
    rule = lls.create_rule(row.rule, **row.rule_options)
    signal = rule.signal(1, torch.Size((256, 32, 32)), 2, 100)  # VGG8's second block: d_l = 1024
    assert signal.classifier.shape == (100, 2048)  # the K x 2048 matrix actually trained
    assert signal.readout_matrix(torch.zeros(())).shape == (100, 1024)


def test_table2_smallconvl_scores_its_dense_block_at_2048():
    """Table 2's SmallConvL runs as the authors': the 1024-unit dense latent pooled to 2048."""
    (preset,) = select("table2", "cifar10", rule="lls")  # the other datasets' rows differ in data only
    config = preset.config(seed=0)
    shape, classes = dataset_shape(config.dataset)
    trainer = build_trainer(config.model, config.rule, shape, classes, rule_options=config.rule_options)
    assert [s.dim for s in trainer.signals] == [96 * 16, 192 * 4, 512 * 4, 2048]
    assert trainer.net.block_output_shapes(shape)[-1] == torch.Size([1024])


def paper_presets() -> set[tuple]:
    """The runs of METHOD.md section 7 with the recipe of section 6, written out from the paper:
    (table, dataset, model, rule, row label, epochs, augmentation, rule options)."""
    wide = {"readout_width": 2048}  # the authors' VGG8 K x 2048 matrices
    rows = []
    for dataset in ("mnist", "fashion-mnist", "cifar10", "imagenette"):
        natural = dataset in ("cifar10", "imagenette")
        for model in ("smallconv", "vgg8"):
            epochs = 300 if model == "vgg8" and natural else 100
            augment = ("aug" if model == "vgg8" else "basic") if natural else None
            for basis in ("random", "periodic", "square"):
                options = {"basis": basis, **(wide if basis == "random" and model == "vgg8" else {})}
                rows.append(("table1", dataset, model, "lls", f"LLS ({basis})", epochs, augment, options))
    for dataset, augment in (("mnist", None), ("cifar10", "basic"), ("cifar100", "basic")):
        rows.append(("table2", dataset, "smallconvl", "bp", "BP", 100, augment, {}))
        rows.append(("table2", dataset, "smallconvl", "dfa", "DFA", 100, augment, {}))
        rows.append(
            ("table2", dataset, "smallconvl", "lls", "LLS (square)", 100, augment, {"basis": "square"})
        )
    square = {"basis": "square"}
    for dataset, augment in (
        ("cifar10", "aug"),
        ("cifar100", "aug"),
        ("imagenette", "aug"),
        ("tinyimagenet", "aug"),
        ("vww", None),
    ):
        table3 = [
            ("bp", "BP", {}),
            ("local-classifier", "Local classifiers", wide),
            ("lls", "LLS", square),
            ("lls-m", "LLS-M", square),
            ("lls-mxm", "LLS-MxM", square),
        ]
        if dataset in ("cifar100", "tinyimagenet"):  # R = 100 for the 100- and 200-class sets
            table3.append(("lls-mxm", "LLS-MxM (R=100)", {"basis": "square", "reduced": 100}))
        rows += [("table3", dataset, "vgg8", r, label, 300, augment, o) for r, label, o in table3]
    # the same-budget comparison (not a table of the paper): every registered rule with its
    # defaults, LLS once per basis kind
    labels = {"bp": "BP", "dfa": "DFA", "drtp": "DRTP", "lls-m": "LLS-M", "lls-mxm": "LLS-MxM"}
    labels["local-classifier"] = "Local classifiers"
    for dataset in ("mnist", "fashion-mnist"):
        for rule in lls.list_rules():
            if rule == "lls":
                for kind in lls.BASIS_KINDS:
                    rows.append(
                        ("compare", dataset, "smallconv", rule, f"LLS ({kind})", 100, None, {"basis": kind})
                    )
            else:
                rows.append(("compare", dataset, "smallconv", rule, labels[rule], 100, None, {}))
    return {(*row[:7], tuple(sorted(row[7].items()))) for row in rows}


def test_presets_are_the_papers_runs():
    """Every preset is a run of the paper's tables (or the same-budget comparison), once. The table
    is built anew here (not read from the import-time constant) so that a mutation of how it is
    built is seen."""
    from lls.training import presets

    built = presets._presets()
    assert built == list(PRESETS)
    rows = [
        (
            p.table,
            p.dataset,
            p.model,
            p.rule,
            p.label,
            p.epochs,
            p.augment,
            tuple(sorted(p.rule_options.items())),
        )
        for p in built
    ]
    assert len(rows) == len(set(rows))
    assert set(rows) == paper_presets()


@pytest.mark.parametrize(
    "label,slug",
    [
        ("LLS (random)", "lls-random"),
        ("LLS-MxM (R=100)", "lls-mxm-r100"),
        ("Local classifiers", "local-classifiers"),
    ],
)
def test_preset_names_are_slugs_of_the_row_labels(label, slug):
    preset = lls.training.presets.Preset("table3", "cifar100", "vgg8", "lls", label, 300)
    assert preset.slug == slug
    assert preset.name == f"table3/cifar100/vgg8/{slug}"
    assert hash(preset) == hash(dataclasses.replace(preset, epochs=1))  # the name identifies a run
    assert hash(preset) != hash(dataclasses.replace(preset, dataset="cifar10"))


def test_select_filters_on_every_field_and_rule_slug():
    from lls.training.presets import with_epochs

    chosen = select("table3", "cifar100", "vgg8", "lls-mxm-r100")
    assert [p.label for p in chosen] == ["LLS-MxM (R=100)"]
    assert {p.label for p in select("table3", "cifar100", rule="lls-mxm")} == {"LLS-MxM", "LLS-MxM (R=100)"}
    assert {p.model for p in select("table1", "mnist")} == {"smallconv", "vgg8"}
    assert {p.table for p in select(dataset="fashion-mnist", model="smallconv")} == {"table1", "compare"}
    assert len(select()) == len(PRESETS)
    with pytest.raises(lls.LLSError, match="unknown table 'table9'; known: table1, table2, table3, compare"):
        select("table9")
    with pytest.raises(lls.LLSError) as caught:
        select("table2", "vww")
    assert str(caught.value) == (
        "no preset matches table=table2 dataset=vww model=None rule=None; see `lls reproduce --list`"
    )
    assert with_epochs(chosen[0], 3).epochs == 3 and with_epochs(chosen[0], None) is chosen[0]


def test_preset_config_is_the_run_with_the_seed():
    (preset,) = select("table1", "cifar10", "vgg8", "lls-random")
    config = preset.config(seed=7)
    assert (config.dataset, config.model, config.rule, config.epochs, config.augment, config.seed) == (
        "cifar10",
        "vgg8",
        "lls",
        300,
        "aug",
        7,
    )
    assert {k: config.rule_options[k] for k in ("seed", "basis", "readout_width")} == {
        "seed": 7,
        "basis": "random",
        "readout_width": 2048,
    }
    (bp,) = select("table2", "mnist", rule="bp")
    assert bp.config(seed=7).rule_options == {}  # bp draws no fixed random tensors
