"""`python train.py fusion=parallel`: thin shim over the package entry point `vqa.cli.train`."""

from vqa.cli.train import main

if __name__ == "__main__":
    main()
