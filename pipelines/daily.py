"""The daily training pipeline (DESIGN §2, §4): data → S-IDs → prompts → SFT → DPO → evaluate → gate, and only if
the gate promotes the candidate: compile → bundle → near-line recall into Feast → deploy.

The gate is a pipeline condition: a candidate that does not beat the deployed model ends the run before compile,
and the run succeeds. Run-time parameters: the dataset, model preset, config, S-ID settings, device and where to
deploy. Two choices shape the DAG and are made when it is built: whether DPO runs (a run-time switch would need
`dsl.OneOf` over artifacts to join the branches, which kfp.local cannot run yet) and whether the GPU steps ask for
a GPU (resource requests are part of the compiled pipeline).
"""

from dataclasses import dataclass, field

from kfp import dsl

import components as c

GPU_STEPS = ("sft", "dpo", "compile-model", "nearline")
# Steps that read or write state outside their artifacts (the deployed model, Feast) must run every time; the
# others are functions of their inputs, and KFP may reuse an earlier run's outputs for them.
UNCACHED_STEPS = ("evaluate", "nearline", "deploy")


@dataclass(frozen=True)
class Shape:
    """Build-time choices of the pipeline."""

    dpo: bool = True
    gpu: bool = False  # GPU_STEPS run in `gpu_image` and request one `accelerator`
    accelerator: str = "nvidia.com/gpu"
    image: str = c.IMAGE
    gpu_image: str = "leadre:gpu"
    deploy_pvc: str = ""  # a PVC holding the deploy root, mounted at `deploy_mount` into evaluate and deploy
    deploy_mount: str = "/mnt/leadre"
    env: dict[str, str] = field(default_factory=dict)  # environment of the nearline step (e.g. Feast's Redis)


def _resources(task: dsl.PipelineTask, shape: Shape, cpu: str, memory: str) -> dsl.PipelineTask:
    task.set_cpu_request(cpu).set_memory_request(memory)
    if task.name in UNCACHED_STEPS:
        task.set_caching_options(False)
    if shape.gpu and task.name in GPU_STEPS:
        task.set_container_image(shape.gpu_image).set_accelerator_type(shape.accelerator).set_accelerator_limit(1)
    elif shape.image != c.IMAGE:
        task.set_container_image(shape.image)
    return task


def _mount_deploy_root(task: dsl.PipelineTask, shape: Shape) -> None:
    if shape.deploy_pvc:
        from kfp import kubernetes

        kubernetes.mount_pvc(task, pvc_name=shape.deploy_pvc, mount_path=shape.deploy_mount)


def build_pipeline(shape: Shape = Shape()):
    """The daily pipeline for these build-time choices (a KFP pipeline function: compile it, or call it under
    kfp.local)."""

    @dsl.pipeline(name="leadre-daily" if shape.dpo else "leadre-daily-no-dpo",
                  description="LEADRE daily training: data → S-IDs → prompts → SFT"
                              + (" → DPO" if shape.dpo else "") + " → evaluate → gate → compile → bundle → "
                              "near-line recall → deploy")
    def daily(source: str = "synth", path: str = "", users: int = 2000, seed: int = 0, preset: str = "tiny",
              config: str = "", sid_levels: int = 0, sid_codes: int = 0, device: str = "auto",
              deploy_root: str = shape.deploy_mount if shape.deploy_pvc else "", feature_repo: str = "",
              feast_production: bool = False, compile_backend: str = "auto", inference_services: str = "",
              namespace: str = "leadre"):
        data = _resources(c.ingest(source=source, path=path, users=users, seed=seed), shape, "1", "2Gi")
        sids = _resources(c.semantic_ids(data=data.outputs["data"], config=config, levels=sid_levels, codes=sid_codes,
                                         seed=seed), shape, "2", "4Gi")
        prompts = _resources(c.prompts(data=data.outputs["data"], sids=sids.outputs["sids"], config=config, seed=seed),
                             shape, "1", "4Gi")
        sft = _resources(c.sft(prompts=prompts.outputs["prompts"], sids=sids.outputs["sids"], preset=preset,
                               config=config, device=device, seed=seed), shape, "2", "8Gi")
        models = {"sft_model": sft.outputs["model"]}
        if shape.dpo:
            dpo = _resources(c.dpo(sft_model=sft.outputs["model"], prompts=prompts.outputs["prompts"],
                                   data=data.outputs["data"], config=config, device=device, seed=seed),
                             shape, "2", "8Gi")
            models["dpo_model"] = dpo.outputs["model"]
        evaluation = _resources(c.evaluate(data=data.outputs["data"], sids=sids.outputs["sids"], deploy_root=deploy_root,
                                           config=config, device=device, seed=seed, **models), shape, "2", "8Gi")
        _mount_deploy_root(evaluation, shape)
        gate = _resources(c.gate(evaluation=evaluation.outputs["evaluation"],
                                 deployed_evaluation=evaluation.outputs["deployed_evaluation"], config=config, **models),
                          shape, "1", "2Gi")
        # kfp.local resolves a condition on a task output only when it is the single return value ("Output").
        with dsl.If(gate.outputs["Output"] == True, name="promoted"):  # noqa: E712 (a KFP condition, not Python)
            compiled = _resources(c.compile_model(candidate=gate.outputs["candidate"], sids=sids.outputs["sids"],
                                                  backend=compile_backend, config=config, device=device),
                                  shape, "2", "8Gi")
            bundle = _resources(c.bundle(candidate=gate.outputs["candidate"], sids=sids.outputs["sids"],
                                         data=data.outputs["data"], compiled=compiled.outputs["compiled"]),
                                shape, "1", "4Gi")
            nearline = _resources(c.nearline(bundle=bundle.outputs["bundle"], data=data.outputs["data"],
                                             feature_repo=feature_repo, feast_production=feast_production,
                                             config=config, device=device), shape, "2", "8Gi")
            for name, value in shape.env.items():
                nearline.set_env_variable(name, value)
            deploy = _resources(c.deploy(bundle=bundle.outputs["bundle"], deploy_root=deploy_root,
                                         inference_services=inference_services, namespace=namespace,
                                         deploy_pvc=shape.deploy_pvc), shape, "500m", "1Gi")
            deploy.after(nearline)  # serving switches only once Feast holds the new model's lists
            _mount_deploy_root(deploy, shape)

    return daily
