"""medusa_core stays pure: it imports with ray, fastapi and starlette blocked."""
import subprocess
import sys

BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'ray', 'fastapi', 'starlette', 'deployments'}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import medusa_core, medusa_core.config, medusa_core.decode, medusa_core.generator, medusa_core.heads
import medusa_core.tree, medusa_core.verify, medusa_core.backends.hf, medusa_core.__main__
print('ok')
"""


def test_core_imports_without_ray_or_fastapi():
    out = subprocess.run([sys.executable, "-c", BLOCK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
