// SPDX-License-Identifier: GPL-2.0
/* block_device_operations.submit_bio returns void */
#include <linux/blkdev.h>
static void dbd_sb(struct bio *b) { }
static __maybe_unused const struct block_device_operations dbd_probe = { .submit_bio = dbd_sb };
