r"""Images in, tensors out: the built-in datasets, Debian's openclipart, the ImageFolder reader with its checks, and the DataLoader.

Datasets: built-in real data written as ImageFolder PNG trees, and a validating ImageFolder reader.

    transferkit data builtin digits --out data/target --per-class 60 --size 32 --train-per-class 10

Layout read by every stage (torchvision ImageFolder convention):
    DIR/{train,val,test}/<class>/<image>   or   DIR/<class>/<image> (taken as train)
    or images directly in DIR (unlabelled: valid for drift only).
Missing val/test splits are split off train, stratified and seeded.

What the reader does with bad input (documented contract, tested):
    path missing / not a folder / no images ........... DataError naming the path
    class folder without a readable image ............. DataError naming the folder
    fewer than `min_classes` classes ................... DataError
    class in val/test that train lacks ................. DataError
    corrupt or truncated image, decompression bomb ..... skipped, listed in `skipped` with the reason
    non-image file (by extension), hidden file ......... skipped, listed in `skipped`
    file or folder name that is not valid UTF-8 ....... skipped, listed in `skipped` (bytes shown as \xNN)
    grayscale / RGBA / LA / palette / 16-bit / CMYK .... converted to 8-bit RGB (alpha composited on black)
    EXIF orientation ................................... applied (phone photos are read upright)
    DIR/unlabelled/<image> (top level) ................. never a class: `Dataset.unlabelled`, in the md5
"""
