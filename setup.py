"""The one build step pyproject.toml cannot express: the auto-tracing start-up hook
(``boltstream-autotrace.pth``, see producers/startup.py) goes to the root of the wheel, where Python's
``site`` module finds it in site-packages. Editable installs get it from infra/install.sh."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

STARTUP_HOOK = "boltstream-autotrace.pth"


class BuildWithStartupHook(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            self.copy_file(STARTUP_HOOK, str(Path(self.build_lib) / STARTUP_HOOK))


setup(cmdclass={"build_py": BuildWithStartupHook})
