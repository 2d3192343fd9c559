"""configs/accelerate/: every file is one the installed `accelerate launch` reads and turns into a launch.

The launch checks call accelerate's own parser and its `_validate_launch_command` (private, but it is exactly
what `accelerate launch --config_file FILE` runs before starting anything), then build the environment the
launcher would hand the workers. The SLURM script is run with stand-ins for `scontrol`, `srun` and
`accelerate` that print what each node would launch.
"""

import os
import subprocess
from pathlib import Path
from unittest import mock

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env

from ldm.unet import UNetConfig, build_unet

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
SLURM_SCRIPT = CONFIGS / "slurm_multinode.sh"
EXPECTED = {
    "single_gpu.yaml": DistributedType.NO,
    "multi_gpu.yaml": DistributedType.MULTI_GPU,
    "multi_node.yaml": DistributedType.MULTI_GPU,
    "fsdp.yaml": DistributedType.FSDP,
}  # no DeepSpeed file: accelerate's backward steps its engine, so the non-finite guard could not skip an update


def validated_launch(name: str):
    """What `accelerate launch --config_file configs/accelerate/NAME -m ldm train-diffusion` resolves to."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "-m", "ldm", "train-diffusion"])
    return _validate_launch_command(args)


def test_the_folder_holds_exactly_the_documented_examples():
    assert sorted(p.name for p in CONFIGS.iterdir()) == sorted([*EXPECTED, "slurm_multinode.sh"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_config_loads_as_an_accelerate_cluster_config(name):
    raw = yaml.safe_load((CONFIGS / name).read_text(encoding="utf-8"))
    assert isinstance(raw, dict) and raw["mixed_precision"] == "no"  # precision comes from the ldm config
    config = load_config_from_file(str(CONFIGS / name))  # unknown top-level keys would raise here
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == EXPECTED[name]
    args, defaults, _ = validated_launch(name)
    assert defaults.distributed_type == EXPECTED[name]
    assert args.num_processes == raw["num_processes"] and args.num_machines == raw["num_machines"]
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == (
        EXPECTED[name] == DistributedType.MULTI_GPU,
        EXPECTED[name] == DistributedType.FSDP,
        EXPECTED[name] == DistributedType.DEEPSPEED,
    )


def test_fsdp_config_builds_the_plugin_and_wraps_blocks_the_unet_has():
    args, _, _ = validated_launch("fsdp.yaml")
    env = prepare_multi_gpu_env(args)
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables the workers would get
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    tiny = UNetConfig(block_out_channels=(32, 32), attention_head_dim=16)
    unet = build_unet(tiny, in_channels=4, out_channels=4, cross_attention_dim=32, sample_size=8)
    present = {type(module).__name__ for module in unet.modules()}
    assert set(plugin.transformer_cls_names_to_wrap) <= present


def test_slurm_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SLURM_SCRIPT)], check=True)


def run_slurm_script(tmp_path: Path, *args: str, node_id: int = 1) -> subprocess.CompletedProcess:
    """Run the batch script as node `node_id` of a 2-node job with 4 GPUs each; `accelerate` prints its args.

    The stand-ins are exported bash functions, not script files: executing a file this process has just
    written can fail with "Text file busy" when any thread forks while the file is open for writing.
    """
    stubs = {
        "scontrol": 'printf "gpu-node-a\\ngpu-node-b\\n"',
        # srun runs the command here, as node STUB_NODEID would (srun sets SLURM_NODEID per node).
        "srun": 'while [[ "$1" == --* ]]; do shift; done; SLURM_NODEID=$STUB_NODEID exec "$@"',
        "accelerate": 'printf "%s\\n" "$@"',
    }
    env = os.environ | {f"BASH_FUNC_{name}%%": f"() {{ {body}\n}}" for name, body in stubs.items()}
    env |= {
        "SLURM_JOB_NODELIST": "gpu-node-[a-b]",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "0",  # the batch step runs on node 0; only srun's tasks see their own node id
        "STUB_NODEID": str(node_id),
        "SLURM_GPUS_ON_NODE": "4",
    }
    return subprocess.run(["bash", str(SLURM_SCRIPT), *args], env=env, capture_output=True, text=True, cwd=tmp_path)


def launched_args(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    return lines[lines.index("launch") :]


def test_slurm_script_launches_each_node_with_its_rank_and_the_main_address(tmp_path):
    out = tmp_path / "runs" / "diffusion"
    ldm_args = ("train-diffusion", "--config", "configs/diffusion_sd_256.yaml", "--output-dir", str(out))
    proc = run_slurm_script(tmp_path, *ldm_args, node_id=1)
    assert proc.returncode == 0, proc.stderr
    args = launched_args(proc.stdout)
    options = dict(zip(args[1:11:2], args[2:11:2], strict=True))
    assert options == {
        "--config_file": "configs/accelerate/multi_node.yaml",
        "--num_machines": "2",
        "--num_processes": "8",
        "--machine_rank": "1",
        "--main_process_ip": "gpu-node-a",
    }
    assert args[11:15] == ["--main_process_port", "29500", "-m", "ldm"]
    assert args[15:] == list(ldm_args)  # a fresh run: nothing to resume from

    (out / "checkpoints" / "step_0000100").mkdir(parents=True)
    (out / "checkpoints" / "step_0000100" / "trainer_state.json").write_text('{"step": 100}', encoding="utf-8")
    proc = run_slurm_script(tmp_path, *ldm_args, node_id=0)
    assert proc.returncode == 0, proc.stderr
    resumed = launched_args(proc.stdout)
    assert resumed[resumed.index("--machine_rank") + 1] == "0"
    assert resumed[-2:] == ["--resume", "latest"]  # a requeued job continues from its checkpoint


def test_slurm_script_without_a_command_prints_its_usage(tmp_path):
    proc = run_slurm_script(tmp_path)
    assert proc.returncode == 2 and "usage: sbatch" in proc.stderr
