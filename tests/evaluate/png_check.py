"""What every PNG an evaluation tool writes must be."""

from pathlib import Path

import matplotlib.image


def assert_png(path: Path) -> None:
    """A real, decodable, non-blank PNG."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert float(image[..., :3].std()) > 0.01, f"{path} is blank"
