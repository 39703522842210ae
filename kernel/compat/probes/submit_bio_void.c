// SPDX-License-Identifier: GPL-2.0
/* submit_bio_noacct returns void (5.16+) instead of blk_qc_t */
#include <linux/bio.h>
#include <linux/blkdev.h>
static __maybe_unused void (* dbd_probe)(struct bio *) = submit_bio_noacct;
