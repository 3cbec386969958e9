"""The pack's models folder: ComfyUI/models/tensorrt (shared with other TensorRT packs), .engine / .plan."""
import os

import folder_paths

from ..engines.engine_store import ENGINE_SUFFIXES, EngineStore
from ..engines.scratch import remove_abandoned_scratch

FOLDER = "tensorrt"


def register_tensorrt_folder() -> None:
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[FOLDER] = (paths, set(extensions) | set(ENGINE_SUFFIXES))
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(ENGINE_SUFFIXES))
    # what a build (or a checkpoint export) killed in the last session left in these folders
    for folder in [*folder_paths.get_folder_paths(FOLDER), *folder_paths.get_folder_paths("diffusion_models")]:
        if os.path.isdir(folder):
            remove_abandoned_scratch(folder)


def engine_store() -> EngineStore:
    """Engines are written to the first registered tensorrt folder."""
    return EngineStore(folder_paths.get_folder_paths(FOLDER)[0])
