import pytest

from gig_dist.config import ConfigError, load_config

pytestmark = pytest.mark.fast


def test_embedded_default_is_the_toy_world():
    config = load_config()
    assert config.model.name == "toy" and config.dataset.kind == "toy"
    assert config.taps is None  # every residual block output


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("dataset.stride=0", "dataset.stride = 0: Input should be greater than or equal to 1"),
        ("extract.batch_size=-3", "extract.batch_size = -3"),
        ("runtime.kind=spark", "runtime.kind = 'spark': Input should be 'local' or 'ray'"),
        ("extract.dtype=int8", "extract.dtype = 'int8'"),
        ("store.images_per_chunk=7", "store.images_per_chunk (7) must divide store.images_per_unit (64)"),
        ("dataset.kind=imagefolder", "dataset.path is required when dataset.kind is 'imagefolder'"),
        ("transform.std=[1,0,1]", "transform.std must be positive"),
        ("model.name=resnet50", "model.weights = 'shipped' exists only for the toy model"),
        ("taps=[]", "taps is empty"),
    ],
)
def test_invalid_values_name_key_and_value(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value)


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"model\.nmae: unknown key \(did you mean 'name'\?\)"):
        load_config(None, ["model.nmae=resnet50"])


def test_overrides_are_parsed_as_yaml():
    config = load_config(None, ["taps=[layer1.0, layer3.1]", "dataset.limit=10", "model.weights=none"])
    assert config.taps == ("layer1.0", "layer3.1")
    assert config.dataset.limit == 10
    assert config.model.weights is None


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("dataset:\n  toy:\n    num_images: 12\nextract:\n  batch_size: 4\n")
    config = load_config(path, ["extract.batch_size=2"])
    assert config.dataset.toy.num_images == 12
    assert config.extract.batch_size == 2


@pytest.mark.parametrize(
    ("content", "expected"),
    [("- a\n- b\n", "must hold a mapping"), ("a: [1,\n", "not valid YAML")],
)
def test_bad_config_files(tmp_path, content, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_malformed_override():
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["dataset.limit"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # NaN lambda gave all-zero codes and GIG, exit status 0; NaN mean failed three stages
        # later naming a tap; an infinite multiplier was an OverflowError in the concepts stage.
        ("decompose.lambda_rel=.nan", r"decompose.lambda_rel.* = nan: Input should be a finite number"),
        ("decompose.lambda_rel={layer1.0: .inf}", r"decompose.lambda_rel.*layer1.0 = inf: Input should be a finite"),
        ("transform.mean=[.nan,0.5,0.5]", r"transform.mean.0 = nan: Input should be a finite number"),
        ("transform.std=[1,1,.inf]", r"transform.std.2 = inf: Input should be a finite number"),
        ("concepts.k_multiplier=.inf", r"concepts.k_multiplier = inf: Input should be a finite number"),
        # A boolean was read as 1 (or 0) wherever a number is expected.
        ("store.images_per_unit=true", r"store: images_per_unit = true: a number is expected, not a boolean"),
        ("gig.steps=true", r"gig: steps = true: a number is expected, not a boolean"),
        ("dataset.limit=false", r"dataset: limit = false: a number is expected, not a boolean"),
    ],
)
def test_values_that_would_pass_and_ruin_a_run_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("gig:\n  steps: 16\n  targets: 8\n  steps: 64\n")
    with pytest.raises(ConfigError, match=r"key 'steps' appears twice in one section \(lines 2 and 4\)"):
        load_config(path)
    path.write_text("gig:\n  steps: 16\nsample:\n  steps: 3\n")  # the same name in two sections is fine
    with pytest.raises(ConfigError, match="sample.steps: unknown key"):
        load_config(path)


@pytest.mark.parametrize(("override", "message"), [
    ("transform.resize=100000", r"extract: a worker's planned peak memory is 149\.\d GiB, more than "
                                r"runtime.worker_memory_gib \(4\.0 GiB\); it grows with transform.resize = 100000"),
    ("sample.per_image=1000000", r"sample: a worker's planned peak memory is 100\.\d GiB, more than "
                                 r"runtime.worker_memory_gib \(4\.0 GiB\); it grows with sample.per_image = 1000000"),
])
def test_settings_whose_planned_memory_exceeds_a_workers_are_refused_before_any_work(tmp_path, override, message):
    """Both passed every check and were stopped past 6 GB of resident memory."""
    import warnings

    from gig_dist import pipeline
    from tests.conftest import toy_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the concept checks' own warnings about the few samples
        with pytest.raises(ConfigError, match=message):
            pipeline.run(toy_config(override, "runtime.worker_memory_gib=4", "extract.batch_size=32",
                                    "store.images_per_unit=64", "store.images_per_chunk=8", "concepts.k_multiplier=0.01"),
                         tmp_path / "r.zarr", until="sample")
    assert not (tmp_path / "r.zarr").exists()
    # The toy world's defaults fit a small laptop's worker, every stage of the pipeline.
    from gig_dist.pipeline import collect_facts, memory_errors
    from gig_dist.stages.registry import stages_until

    config = load_config(None, ["runtime.worker_memory_gib=2"])
    assert memory_errors(config, collect_facts(config)[0], stages_until(None)) == []


def test_validating_a_config_imports_no_torch_faiss_zarr_or_ray():
    """The config sits at the bottom of the house: a config error comes before any heavy import."""
    import subprocess
    import sys

    code = ("import sys\nfrom gig_dist.config import load_config\n"
            "load_config(None, ['concepts.method=kmeans', 'gig.steps=16'])\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'faiss', 'zarr', 'ray', 'numpy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_dataset_path_with_the_toy_kind_is_refused_naming_the_kind():
    """-o dataset.path=photos without dataset.kind=imagefolder once ran the toy world silently."""
    with pytest.raises(ConfigError, match=r"dataset.path = 'photos' is given but dataset.kind is 'toy'"):
        load_config(None, ["dataset.path=photos"])
