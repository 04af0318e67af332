"""The pipeline's steps as KFP v2 lightweight Python components.

Each is a thin wrapper: it hands the paths of its input and output artifacts to one function of
`leadre.pipeline` and logs the numbers it returns as KFP metrics. KFP ships only the function's own source to the
container, so the wrappers import everything they use inside their bodies; the image (`leadre:cpu`, or
`leadre:gpu` for a GPU pipeline) has the `leadre` package and kfp installed, hence `install_kfp_package=False`.
Artifacts are directories (`artifact.path`) with a `manifest.json`; reports are Markdown or HTML files that the
KFP UI shows beside the run.
"""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

IMAGE = "leadre:cpu"
component = dsl.component(base_image=IMAGE, install_kfp_package=False)


@component
def ingest(source: str, path: str, users: int, seed: int, data: Output[Dataset], report: Output[Markdown]):
    from leadre import pipeline

    pipeline.ingest(source, path, users, seed, data.path, report.path)


@component
def semantic_ids(data: Input[Dataset], config: str, levels: int, codes: int, seed: int, sids: Output[Dataset],
                 metrics: Output[Metrics], report: Output[Markdown]):
    from leadre import pipeline

    numbers = pipeline.semantic_ids(data.path, sids.path, config, levels, codes, seed, report.path)
    pipeline.log_metrics(metrics, numbers)


@component
def prompts(data: Input[Dataset], sids: Input[Dataset], config: str, seed: int, prompts: Output[Dataset],
            report: Output[Markdown]):
    from leadre import pipeline

    pipeline.prompts(data.path, sids.path, prompts.path, config, seed, report.path)


@component
def sft(prompts: Input[Dataset], sids: Input[Dataset], preset: str, config: str, device: str, seed: int,
        model: Output[Model], metrics: Output[Metrics], report: Output[Markdown]):
    from leadre import pipeline

    numbers = pipeline.sft(prompts.path, sids.path, model.path, preset, config, device, seed, report.path)
    pipeline.log_metrics(metrics, numbers)


@component
def dpo(sft_model: Input[Model], prompts: Input[Dataset], data: Input[Dataset], config: str, device: str, seed: int,
        model: Output[Model], metrics: Output[Metrics], report: Output[Markdown]):
    from leadre import pipeline

    numbers = pipeline.dpo(sft_model.path, prompts.path, data.path, model.path, config, device, seed, report.path)
    pipeline.log_metrics(metrics, numbers)


@component
def evaluate(data: Input[Dataset], sids: Input[Dataset], sft_model: Input[Model], deploy_root: str, config: str,
             device: str, seed: int, evaluation: Output[Dataset], deployed_evaluation: Output[Dataset],
             metrics: Output[Metrics], table: Output[Markdown], plot: Output[HTML], dpo_model: Input[Model] = None):
    from leadre import pipeline

    models = {"dpo": dpo_model.path} if dpo_model is not None else {}
    models["sft"] = sft_model.path
    numbers = pipeline.evaluate(data.path, sids.path, models, deploy_root, evaluation.path, deployed_evaluation.path,
                                config, device, seed, table.path, plot.path)
    pipeline.log_metrics(metrics, numbers)


@component
def gate(evaluation: Input[Dataset], deployed_evaluation: Input[Dataset], sft_model: Input[Model], config: str,
         candidate: Output[Model], metrics: Output[Metrics], decision: Output[Markdown],
         dpo_model: Input[Model] = None) -> bool:
    from leadre import pipeline

    models = {"sft": sft_model.path} | ({"dpo": dpo_model.path} if dpo_model is not None else {})
    promote, numbers = pipeline.gate(evaluation.path, deployed_evaluation.path, models, config, candidate.path,
                                     decision.path)
    pipeline.log_metrics(metrics, numbers)
    return promote


@component
def compile_model(candidate: Input[Model], sids: Input[Dataset], backend: str, config: str, device: str,
                  compiled: Output[Model], report: Output[Markdown]):
    from leadre import pipeline

    compiled.metadata.update(pipeline.compile_model(candidate.path, sids.path, compiled.path, backend, config, device,
                                                    report.path))


@component
def bundle(candidate: Input[Model], sids: Input[Dataset], data: Input[Dataset], compiled: Input[Model],
           bundle: Output[Model], report: Output[Markdown]):
    from leadre import pipeline

    manifest = pipeline.bundle(candidate.path, sids.path, data.path, compiled.path, bundle.path, report.path)
    bundle.metadata["model_version"] = manifest["model_version"]


@component
def nearline(bundle: Input[Model], data: Input[Dataset], feature_repo: str, feast_production: bool, config: str,
             device: str, recall_lists: Output[Dataset], metrics: Output[Metrics], report: Output[Markdown]):
    from leadre import pipeline

    numbers = pipeline.nearline(bundle.path, data.path, feature_repo, feast_production, config, device,
                                recall_lists.path, report.path)
    pipeline.log_metrics(metrics, numbers)


@component
def deploy(bundle: Input[Model], deploy_root: str, inference_services: str, namespace: str, deploy_pvc: str,
           report: Output[Markdown]) -> str:
    from leadre import pipeline

    return pipeline.deploy(bundle.path, bundle.uri, deploy_root, inference_services, namespace, deploy_pvc, report.path)
