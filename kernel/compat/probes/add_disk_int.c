// SPDX-License-Identifier: GPL-2.0
/* add_disk() returns int (5.15+) */
#include <linux/blkdev.h>
static __maybe_unused int dbd_probe(struct gendisk *d) { return add_disk(d); }
