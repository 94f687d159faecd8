"""`python train.py fusion=parallel`: thin shim over the package entry point `vqa.train`."""

from vqa.train import main

if __name__ == "__main__":
    main()
