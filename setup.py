import pathlib
import re

from setuptools import setup

HERE = pathlib.Path(__file__).resolve().parent


def _version() -> str:
    # pyraft/_version.py is the one place the version is written; read it without importing
    # pyraft, whose dependencies need not be installed while it is being built.
    text = (HERE / "pyraft" / "_version.py").read_text(encoding="utf-8")
    return re.search(r'^__version__ = "([^"]+)"$', text, re.M).group(1)


# transports/, stores/ and tools/ live at the top of the repository but are
# installed as pyraft.transports, pyraft.stores and pyraft.tools, so that no
# generic top-level name is put into site-packages.
setup(
    name="pyraft",
    version=_version(),
    description="Raft consensus for threaded Python programs: ZeroMQ transport, LMDB storage",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    keywords=["raft", "consensus", "replication", "distributed", "lmdb", "zeromq"],
    python_requires=">=3.10",
    packages=["pyraft", "pyraft.engine", "pyraft.runtime", "pyraft.kv", "pyraft.objects",
              "pyraft.transports", "pyraft.stores", "pyraft.tools"],
    package_dir={
        "pyraft.transports": "transports",
        "pyraft.stores": "stores",
        "pyraft.tools": "tools",
    },
    # PEP 561: the package carries its own type hints.
    package_data={"pyraft": ["py.typed"]},
    install_requires=["pyzmq>=25", "lmdb>=1.4", "msgpack>=1.0"],
    extras_require={
        # mfusepy: the power-loss tests' FUSE filesystem (tests/powerloss/); needs libfuse3 (apt fuse3).
        "test": ["pytest>=7", "pytest-timeout>=2.1", "prometheus_client>=0.16", "etcd3>=0.12",
                 "mfusepy>=3.1,<4", "mypy>=1.8"],
        "bench": ["pysyncobj", "etcd3>=0.12"],
    },
    entry_points={"console_scripts": [
        "pyraft-inspect = pyraft.tools.inspect:main",
        "pyraft-admin = pyraft.tools.admin:main",
        "pyraft-bench = pyraft.tools.bench:main",
        "pyraft-kv = pyraft.tools.kv:main",
    ]},
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Developers",
        "License :: OSI Approved :: Apache Software License",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Topic :: Database",
        "Topic :: System :: Distributed Computing",
        "Typing :: Typed",
    ],
)
