#!/usr/bin/env python
"""Colour quantization: cluster an image's RGB pixels into a K-colour palette.

Writes, to the --out directory (all or nothing): quantized.png (an indexed
PNG with K colours), comparison.png (original, quantized, palette) and
quantization.json (K, colours before and after, bits per pixel, file sizes,
mean squared error, and the error of a random palette of the same size).

Example (scikit-learn's sample photo)::

    python jobs/quantize.py --image "$(python -c 'import sklearn.datasets, os; \\
        print(os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", "china.jpg"))')" \\
        --k 16 --out outputs/china-k16
"""

import argparse
import sys

from kmeans_dask import _cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", required=True, metavar="PATH", help="a PNG, JPEG or other image Pillow reads")
    p.add_argument("--k", type=int, default=16, help="palette size (default: %(default)s)")
    p.add_argument("--sample-pixels", type=int, default=100_000, metavar="N",
                   help="pixels the palette is fitted on (default: %(default)s); every pixel "
                        "is then mapped to it")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier quantization output at --out; anything else is never replaced")
    _cli.add_cluster_options(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _cli.setup(args)
    from kmeans_dask import quantize, store

    # Every check before any cluster work.
    image = quantize.read_image(args.image)
    store.check_output(args.out, quantize.QUANTIZE_FORMAT, overwrite=args.overwrite,
                       inputs=[args.image])
    quantize.check(image, args.k, args.sample_pixels)
    with _cli.open_client(args):
        record = quantize.quantize_file(args.image, args.out, k=args.k,
                                        sample_pixels=args.sample_pixels, random_state=args.seed,
                                        overwrite=args.overwrite)
    print(f"wrote {args.out}: {record['colours_before']:,} colours -> {record['k']}, "
          f"MSE {record['mse']:.2f} (random palette {record['random_palette_mse']:.2f}), "
          f"{record['bytes_original']:,} -> {record['bytes_quantized_png']:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run(main))
