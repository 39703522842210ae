// SPDX-License-Identifier: GPL-2.0
/* filesystems hold their bdev with bd_holder = sb and bd_holder_ops = &fs_holder_ops (6.6+) */
#include <linux/blkdev.h>
#include <linux/fs.h>
static __maybe_unused bool dbd_probe(struct block_device *b) { return b->bd_holder_ops == &fs_holder_ops; }
