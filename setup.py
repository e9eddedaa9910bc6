from setuptools import setup

# transports/, stores/ and tools/ live at the top of the repository but are
# installed as pyraft.transports, pyraft.stores and pyraft.tools, so that no
# generic top-level name is put into site-packages.
setup(
    name="pyraft",
    version="0.1.0",
    description="Raft consensus for threaded Python programs: ZeroMQ transport, LMDB storage",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["pyraft", "pyraft.engine", "pyraft.runtime", "pyraft.kv", "pyraft.objects",
              "pyraft.transports", "pyraft.stores", "pyraft.tools"],
    package_dir={
        "pyraft.transports": "transports",
        "pyraft.stores": "stores",
        "pyraft.tools": "tools",
    },
    install_requires=["pyzmq>=25", "lmdb>=1.4", "msgpack>=1.0"],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout>=2.1"],
        "bench": ["pysyncobj"],
    },
    entry_points={"console_scripts": [
        "pyraft-inspect = pyraft.tools.inspect:main",
        "pyraft-admin = pyraft.tools.admin:main",
        "pyraft-bench = pyraft.tools.bench:main",
        "pyraft-kv = pyraft.tools.kv:main",
    ]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: System :: Distributed Computing",
    ],
)
