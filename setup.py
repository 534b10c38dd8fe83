"""megatron_wan: Reg-DPO training of Wan 2.1 video diffusion models on Megatron-Core."""

import re

from setuptools import find_packages, setup

# the oldest torch with every API the code uses (megatron_wan/__init__.py says which)
MIN_TORCH = re.search(r'^MIN_TORCH = "([0-9.]+)"', open("megatron_wan/__init__.py", encoding="utf-8").read(), re.M)[1]

setup(
    name="megatron_wan",
    version="0.1.0",
    description="Reg-DPO / DPO / SFT training of Wan 2.1 (T2V, I2V) on Megatron-Core with context parallelism",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_wan*", "data_tools*", "launch*"]),
    include_package_data=True,
    install_requires=[
        f"torch>={MIN_TORCH}",
        # megatron-core 0.17+ needs Python 3.12; on 3.11 the newest is 0.16.x.
        "megatron-core>=0.16.1,<0.17; python_version<'3.12'",
        "megatron-core>=0.16.1; python_version>='3.12'",
        "deepspeed>=0.16",
        "diffusers>=0.33",
        "transformers>=4.46",
        "peft>=0.14",
        "decord>=0.6",
        "av>=12",
        "scenedetect>=0.6.4",  # shot boundaries in data_tools filter
        "opencv-python-headless>=4.8",  # PySceneDetect's detectors need cv2
        "pillow>=10",
        "ftfy>=6",  # prompt cleaning exactly as diffusers' Wan pipelines do it
        "einops>=0.8",
        "pyyaml>=6",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "tensorboard>=2.16",
        "moviepy>=1.0.3,<2",  # TensorBoard's add_video (torch imports moviepy.editor, gone in moviepy 2)
        "matplotlib>=3.7",  # curves (constrained layout with an outside legend)
    ],
    entry_points={"console_scripts": ["megatron-wan-train = megatron_wan.train:main"]},
    extras_require={
        "gpu": ["transformer-engine[pytorch]>=2.0", "flash-attn>=2.6"],
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "scikit-video>=1.1.11", "ruff>=0.6", "psutil"],
    },
)
