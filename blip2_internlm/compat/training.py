"""LAVIS's training loop: ``runner_base`` is this package's fault-tolerant runner."""

from blip2_internlm.compat.fixes import fix


@fix
def reliable_runners():
    """RunnerBase/RunnerIter write checkpoints in place, cannot resume mid-epoch and train on through NaN losses and bad samples."""
    from lavis.common.registry import registry

    from blip2_internlm.runner import ReliableRunner, ReliableRunnerIter

    # set, not register: LAVIS's registry refuses a second class under a taken name
    registry.mapping["runner_name_mapping"]["runner_base"] = ReliableRunner
    registry.mapping["runner_name_mapping"]["runner_iter"] = ReliableRunnerIter
