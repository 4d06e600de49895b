"""Device profiles: every shipped profile is valid, errors name the file and field,
detection picks the right board from a faked root, the memory estimate is exact."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from edgellm.runtime.devices import (
    ProfileError,
    detect,
    estimate_memory_mb,
    list_profiles,
    load_profile,
    memory_warning,
    physical_cores,
)
from edgellm.runtime.model_spec import ModelSpec

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["coreml", "generic", "jetson-orin-nano", "npu-qnn", "openvino", "rk3588", "rpi4", "rpi5", "x86-gateway"]

# SmolLM2-135M's shapes, the model the product ships.
SMOLLM2 = ModelSpec(arch="llama", num_layers=30, hidden_size=576, intermediate_size=1536, num_heads=9,
                    num_kv_heads=3, head_dim=64, vocab_size=49152, max_context=8192, tie_embeddings=True)

VALID = """\
name = "custom"
description = "a test board"
threads = 3
providers = [{ name = "CUDAExecutionProvider", device_id = 1, do_copy_in_default_stream = true }, "CPUExecutionProvider"]
max_context = 1024
memory_limit_mb = 512
recommended_quant = "int8"
"""


def test_shipped_profiles_are_the_nine_board_classes():
    assert list_profiles() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads_and_validates(name):
    p = load_profile(name)
    assert p.name == name and p.description
    assert p.threads >= 2 and p.max_context >= 1024 and p.memory_limit_mb >= 1024
    assert p.recommended_quant == "int4"
    # CPU last: every other provider falls back to it.
    assert p.providers[-1] == ("CPUExecutionProvider", {})
    assert all(isinstance(v, str) for _, opts in p.providers for v in opts.values())
    assert (p.detect == ()) == (name == "generic")
    assert p.to_dict()["name"] == name


def test_profile_by_path_normalises_provider_options(tmp_path):
    path = tmp_path / "custom.toml"
    path.write_text(VALID)
    p = load_profile(path)
    assert p.name == "custom" and p.threads == 3 and p.max_context == 1024
    assert p.providers == (
        ("CUDAExecutionProvider", {"device_id": "1", "do_copy_in_default_stream": "1"}),
        ("CPUExecutionProvider", {}),
    )
    assert p.path == str(path)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown device profile 'rpi9'; known: coreml, generic, .*x86-gateway"):
        load_profile("rpi9")
    with pytest.raises(ProfileError, match="not found"):
        load_profile("/nonexistent/board.toml")


def test_invalid_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('name = "broken\n')
    with pytest.raises(ProfileError, match=rf"{path}: not valid TOML"):
        load_profile(path)


@pytest.mark.parametrize("replace, field, why", [
    (("threads = 3", "threads = 0"), "threads", "positive integer"),
    (("threads = 3", 'threads = "many"'), "threads", "positive integer or \"auto\""),
    (("max_context = 1024", "max_context = true"), "max_context", "positive integer"),
    (('recommended_quant = "int8"', 'recommended_quant = "q4_k"'), "recommended_quant", "one of int4"),
    (('"CPUExecutionProvider"]', '"CpuExecutionProvider"]'), "providers[1]", "unknown provider 'CpuExecutionProvider'"),
    (("device_id = 1,", "device_id = [1],"), "providers[0].device_id", "string, number or boolean"),
    (('description = "a test board"\n', ""), "description", "missing"),
    (("threads = 3", "threads = 3\ncores = 4"), "cores", "not a profile field"),
    (("", "[[detect]]\nboard = ['x']\n"), "detect[0].board", "not a hint"),
    (("", "[[detect]]\nmachine = 'x86_64'\n"), "detect[0].machine", "list of strings"),
])
def test_bad_field_names_file_and_field(tmp_path, replace, field, why):
    old, new = replace
    text = VALID.replace(old, new) if old else VALID + new  # no old text: append a table
    path = tmp_path / "bad.toml"
    path.write_text(text)
    tomllib.loads(text)  # the file is valid TOML: the field is what is wrong
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    assert str(err.value).startswith(f"{path}: field {field!r}")
    assert why in str(err.value)


def fake_board(root: Path, model: str = "", compatible: str = "", files: tuple[str, ...] = (),
               cores: int = 4, smt: int = 1, cpu_model: str = "") -> Path:
    """A root with the device tree, sysfs topology and cpuinfo a board would show."""
    if model or compatible:
        dt = root / "proc/device-tree"
        dt.mkdir(parents=True)
        # The kernel exposes these NUL-terminated (compatible: a NUL-separated list).
        (dt / "model").write_bytes(model.encode() + b"\0")
        (dt / "compatible").write_bytes(b"".join(c.encode() + b"\0" for c in compatible.split()))
    for f in files:
        (root / f.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / f.lstrip("/")).write_text("")
    for core in range(cores):
        siblings = ",".join(str(core * smt + t) for t in range(smt))
        for t in range(smt):
            topo = root / f"sys/devices/system/cpu/cpu{core * smt + t}/topology"
            topo.mkdir(parents=True)
            (topo / "core_cpus_list").write_text(siblings + "\n")
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc/cpuinfo").write_text(f"processor\t: 0\nmodel name\t: {cpu_model}\n" if cpu_model else "")
    return root


@pytest.mark.parametrize("model, compatible, files, expected", [
    ("Raspberry Pi 4 Model B Rev 1.5", "raspberrypi,4-model-b brcm,bcm2711", (), "rpi4"),
    ("Raspberry Pi 400 Rev 1.0", "raspberrypi,400 brcm,bcm2711", (), "rpi4"),
    ("Raspberry Pi Compute Module 4 Rev 1.0", "raspberrypi,4-compute-module brcm,bcm2711", (), "rpi4"),
    ("Raspberry Pi 5 Model B Rev 1.0", "raspberrypi,5-model-b brcm,bcm2712", (), "rpi5"),
    ("Raspberry Pi 500 Rev 1.0", "raspberrypi,500 brcm,bcm2712", (), "rpi5"),
    ("NVIDIA Jetson Orin Nano Developer Kit", "nvidia,p3768-0000+p3767-0005 nvidia,tegra234",
     ("/etc/nv_tegra_release",), "jetson-orin-nano"),
    ("NVIDIA Jetson AGX Orin Developer Kit", "nvidia,p3737-0000+p3701-0005 nvidia,tegra234",
     ("/etc/nv_tegra_release",), "jetson-orin-nano"),
    ("Radxa ROCK 5B", "radxa,rock-5b rockchip,rk3588", (), "rk3588"),
    ("Rockchip RK3588 EVB1 LP4 V10 Board", "", (), "rk3588"),
    ("Qualcomm Technologies, Inc. Robotics RB3gen2", "qcom,qcs6490-rb3gen2 qcom,qcm6490",
     ("/dev/fastrpc-cdsp",), "npu-qnn"),
    ("Pine64 RockPro64", "pine64,rockpro64 rockchip,rk3399", (), "generic"),
])
def test_detect_picks_the_board_from_the_device_tree(tmp_path, model, compatible, files, expected):
    root = fake_board(tmp_path, model=model, compatible=compatible, files=files)
    assert detect(root, machine="aarch64", system="Linux", processor="").name == expected


def test_detect_without_a_qualcomm_npu_node_is_not_qnn(tmp_path):
    root = fake_board(tmp_path, model="Qualcomm Technologies, Inc. Robotics RB3gen2", compatible="qcom,qcs6490")
    assert detect(root, machine="aarch64", system="Linux", processor="").name == "generic"


def test_detect_by_platform(tmp_path):
    assert detect(fake_board(tmp_path / "mac"), machine="arm64", system="Darwin", processor="arm").name == "coreml"
    assert detect(fake_board(tmp_path / "win"), machine="ARM64", system="Windows", processor="").name == "npu-qnn"
    gateway = fake_board(tmp_path / "pc", cpu_model="AMD Ryzen Embedded V1605B", cores=4, smt=2)
    p = detect(gateway, machine="x86_64", system="Linux", processor="")
    assert (p.name, p.threads) == ("x86-gateway", 4)  # physical cores, not the 8 SMT threads
    # An Intel CPU with an NPU node is the more specific match.
    npu = fake_board(tmp_path / "ultra", cpu_model="Intel(R) Core(TM) Ultra 7 155H", files=("/dev/accel/accel0",))
    assert detect(npu, machine="x86_64", system="Linux", processor="").name == "openvino"
    no_npu = fake_board(tmp_path / "celeron", cpu_model="Intel(R) Celeron(R) J4125")
    assert detect(no_npu, machine="x86_64", system="Linux", processor="").name == "x86-gateway"


def test_generic_fallback_uses_physical_cores_at_least_two(tmp_path):
    big = fake_board(tmp_path / "big", cores=6, smt=2)
    p = detect(big, machine="riscv64", system="Linux", processor="")
    assert (p.name, p.threads) == ("generic", 6)
    one = fake_board(tmp_path / "one", cores=1)
    assert physical_cores(one) == 2
    assert detect(one, machine="riscv64", system="Linux", processor="").threads == 2
    # big.LITTLE: core ids repeat per cluster, sibling lists do not.
    assert physical_cores(fake_board(tmp_path / "bl", cores=8)) == 8


def test_memory_estimate_hand_computed():
    # KV: 2 (k, v) x 30 layers x 3 kv heads x 64 dims x 2048 tokens x 4 bytes = 94,371,840 B = 90 MiB.
    assert estimate_memory_mb(SMOLLM2, 2048, 100 * 2**20) == pytest.approx(190.0)
    # fp16 KV halves the cache part only.
    assert estimate_memory_mb(SMOLLM2, 2048, 100 * 2**20, kv_bytes_per_value=2) == pytest.approx(145.0)
    generic = load_profile("generic")  # 1024 MiB
    assert memory_warning(generic, SMOLLM2, 2048, 100 * 2**20) is None
    # 8192 tokens: 360 MiB of KV + 700 MiB of weights > 1024.
    warning = memory_warning(generic, SMOLLM2, 8192, 700 * 2**20)
    assert warning is not None and "1060 MiB" in warning and "'generic'" in warning and "1024 MiB" in warning
    # 8 slots of 2048 tokens: 8 x 90 MiB of KV + 100 MiB of weights = 820 MiB, under 1024; 12 slots are not.
    assert estimate_memory_mb(SMOLLM2, 2048, 100 * 2**20, slots=8) == pytest.approx(820.0)
    assert memory_warning(generic, SMOLLM2, 2048, 100 * 2**20, slots=8) is None
    warning = memory_warning(generic, SMOLLM2, 2048, 100 * 2**20, slots=12)
    assert warning is not None and "12 KV cache slots of 2048 tokens" in warning and "1180 MiB" in warning
    assert "fewer --slots" in warning


def test_wheel_config_lists_every_package_and_maps_the_profiles():
    """pyproject lists packages by hand (package-dir needs it): catch a forgotten one."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    # The toolchain's export/ installs as edgellm.export, never as a bare top-level `export`.
    on_disk = {p.parent.relative_to(REPO).as_posix().replace("/", ".").replace("export", "edgellm.export", 1)
               if p.parent.relative_to(REPO).parts[0] == "export" else p.parent.relative_to(REPO).as_posix().replace("/", ".")
               for top in ("edgellm", "export") for p in (REPO / top).rglob("*.py")}
    assert on_disk <= set(tool["packages"])
    assert not any(name == "export" or name.startswith("export.") for name in tool["packages"])
    assert tool["package-dir"]["edgellm.profiles"] == "devices"
    assert tool["package-dir"]["edgellm.export"] == "export"
    assert "*.toml" in tool["package-data"]["edgellm.profiles"]
