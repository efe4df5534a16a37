"""moe_nnunet: Mixture-of-Experts segmentation inside nnU-Net v2 (a plugin, not a fork).

The repository's top-level `planners/` and `trainers/` folders install as `moe_nnunet.planners` and
`moe_nnunet.trainers`, so there is exactly one importable home for every trainer class.
"""
from setuptools import find_packages, setup

setup(
    name="moe_nnunet",
    version="0.1.0",
    description="Mixture-of-Experts (M4oE-style modality experts with a learned gate) for nnU-Net v2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["moe_nnunet", "moe_nnunet.*"]) + ["moe_nnunet.planners",
                                                                        "moe_nnunet.trainers"],
    package_dir={"moe_nnunet.planners": "planners", "moe_nnunet.trainers": "trainers"},
    install_requires=[
        "nnunetv2>=2.8,<2.9",
        "torch>=2.1.2,!=2.9.*",
        "dynamic-network-architectures>=0.4.4,<0.5",
        "timm>=1.0",
        "SimpleITK>=2.2.1",
        "batchgenerators>=0.25.1",
        "batchgeneratorsv2>=0.3.2",
        "numpy>=1.24",
        "scipy>=1.10",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "nilearn>=0.10",
    ],
    extras_require={"bench": ["monai>=1.3"],
                    "test": ["pytest>=7.4", "pytest-timeout>=2.2", "pytest-xdist>=3.5", "filelock>=3.12",
                             "monai>=1.3"]},
    entry_points={"console_scripts": ["moe_nnunet=moe_nnunet.cli:main"]},
)
