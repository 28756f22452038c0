from setuptools import find_packages, setup

setup(
    name="distributed",
    version="0.1.0",
    description="Run Python functions and dask graphs on a cluster",
    long_description=open("README.rst").read(),
    long_description_content_type="text/x-rst",
    license="BSD-3-Clause",
    packages=find_packages(include=["distributed", "distributed.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tornado>=6.2",
        "msgpack>=1.0",
        "cloudpickle>=2.2",
        "dask>=2026.1,<2027",
        "toolz>=0.12",
        "psutil>=5.9",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout>=2.1", "hypothesis>=6", "numpy", "pandas", "pyarrow"],
    },
    entry_points={
        "console_scripts": [
            "dask-scheduler=distributed.cli.dask_scheduler:main",
            "dask-worker=distributed.cli.dask_worker:main",
        ]
    },
)
