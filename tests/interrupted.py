"""Run a pipeline until an epoch, save its state, and finish from that state in a new pipeline."""
from dsdtune.pipeline import Pipeline, PipelineResult


class Stop(Exception):
    pass


def run_interrupted(spec: dict, stop_epoch: int, state_path) -> PipelineResult:
    pipe = Pipeline(spec)

    def stop(metrics, p):
        if metrics["epoch"] == stop_epoch:
            p.save(state_path)
            raise Stop

    try:
        pipe.run(on_epoch=stop)
    except Stop:
        pass
    else:
        raise AssertionError(f"the run ended before epoch {stop_epoch}")
    resumed = Pipeline(spec)
    resumed.restore(state_path)
    return resumed.run()
