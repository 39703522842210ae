// SPDX-License-Identifier: GPL-2.0
/*
 * /dev/dattoN: a read-only, bio-based gendisk showing the origin partition as
 * it was when the snapshot was taken.  Reads are handed to the tracer's COW
 * worker, so they are ordered after any copy-on-write in progress; the worker
 * maps every 4 KiB block to its COW slot (preserved) or to the origin
 * (unchanged).  Blocks of the COW file itself read as the file was at
 * snapshot time (initial header, zeros).  Origin reads are registered as
 * in flight, and the worker holds back an overwriting write until they have
 * completed (like dm-snapshot's tracked chunks).
 */
#include <linux/module.h>
#include <linux/slab.h>
#include "dattobd.h"

static int dbd_major;

struct dbd_rparent {
	struct dbd_io io;
	struct bio *orig;
	struct dbd_tracer *tr;
	struct list_head track;
	u64 b0, b1;
};

#ifdef DBD_HAVE_BDOPS_OPEN_GENDISK
static int dbd_snap_open(struct gendisk *disk, blk_mode_t mode)
{
	struct dbd_tracer *tr = disk->private_data;

	atomic_inc(&tr->open_count);
	return 0;
}

static void dbd_snap_release(struct gendisk *disk)
{
	struct dbd_tracer *tr = disk->private_data;

	atomic_dec(&tr->open_count);
}
#else
static int dbd_snap_open(struct block_device *bdev, fmode_t mode)
{
	struct dbd_tracer *tr = bdev->bd_disk->private_data;

	atomic_inc(&tr->open_count);
	return 0;
}

static void dbd_snap_release(struct gendisk *disk, fmode_t mode)
{
	struct dbd_tracer *tr = disk->private_data;

	atomic_dec(&tr->open_count);
}
#endif

static dbd_mrf_t dbd_snap_submit_bio(struct bio *bio)
{
	struct dbd_tracer *tr = dbd_bio_disk(bio)->private_data;
	unsigned long flags;

	if (bio_op(bio) != REQ_OP_READ) {
		if (bio_op(bio) == REQ_OP_FLUSH ||
		    (bio_op(bio) == REQ_OP_WRITE && !bio_sectors(bio)))
			bio_endio(bio);	/* nothing to flush */
		else {
			bio->bi_status = BLK_STS_NOTSUPP;
			bio_endio(bio);
		}
		DBD_MRF_RETURN;
	}
	if (dbd_tracer_error(tr)) {
		bio_io_error(bio);
		DBD_MRF_RETURN;
	}
	spin_lock_irqsave(&tr->qlock, flags);
	if (!tr->worker || READ_ONCE(tr->hook_mode) != DBD_HOOK_SNAP) {
		spin_unlock_irqrestore(&tr->qlock, flags);
		bio_io_error(bio);
		DBD_MRF_RETURN;
	}
	bio_list_add(&tr->reads, bio);
	spin_unlock_irqrestore(&tr->qlock, flags);
	wake_up(&tr->qwait);
	DBD_MRF_RETURN;
}

static const struct block_device_operations dbd_snap_fops = {
	.owner = THIS_MODULE,
	.open = dbd_snap_open,
	.release = dbd_snap_release,
	.submit_bio = dbd_snap_submit_bio,
};

bool dbd_rtrack_overlaps(struct dbd_tracer *tr, u64 b0, u64 b1)
{
	struct dbd_rparent *p;
	unsigned long flags;
	bool hit = false;

	spin_lock_irqsave(&tr->rlock, flags);
	list_for_each_entry(p, &tr->rtrack, track) {
		if (p->b0 <= b1 && b0 <= p->b1) {
			hit = true;
			break;
		}
	}
	spin_unlock_irqrestore(&tr->rlock, flags);
	return hit;
}

static void dbd_read_done(struct dbd_io *io)
{
	struct dbd_rparent *p = container_of(io, struct dbd_rparent, io);
	struct dbd_tracer *tr = p->tr;
	unsigned long flags;

	spin_lock_irqsave(&tr->rlock, flags);
	list_del(&p->track);
	spin_unlock_irqrestore(&tr->rlock, flags);
	wake_up_all(&tr->rwait);
	if (io->status)
		p->orig->bi_status = errno_to_blk_status(io->status);
	bio_endio(p->orig);
	kfree(p);
}

static void dbd_fill_from_file(struct cow_store *c, struct page *pg, unsigned int off, u64 fsect)
{
	u8 *a = dbd_kmap(pg);
	u64 foff = fsect << 9;

	if (foff < COW_BLOCK)
		memcpy(a + off, (u8 *)c->hdr0 + foff, 512);
	else
		memset(a + off, 0, 512);
	dbd_kunmap(a);
}

/* worker context: map one snapshot read and submit the pieces */
void dbd_snapdev_process_read(struct dbd_tracer *tr, struct bio *bio)
{
	struct cow_store *c = tr->cow;
	struct dbd_rparent *p;
	struct bio_vec bv;
	struct bvec_iter iter;
	struct dbd_bb bb;
	unsigned long flags;
	sector_t first = bio->bi_iter.bi_sector;
	int err = 0;

	if (dbd_tracer_error(tr) || !c) {
		bio_io_error(bio);
		return;
	}
	if (!bio_sectors(bio)) {
		bio_endio(bio);
		return;
	}
	p = kmalloc(sizeof(*p), GFP_NOIO);
	if (!p) {
		bio_io_error(bio);
		return;
	}
	dbd_io_init(&p->io);
	p->io.done_fn = dbd_read_done;
	p->orig = bio;
	p->tr = tr;
	p->b0 = first / COW_BLOCK_SECTS;
	p->b1 = (bio_end_sector(bio) - 1) / COW_BLOCK_SECTS;
	spin_lock_irqsave(&tr->rlock, flags);
	list_add_tail(&p->track, &tr->rtrack);
	spin_unlock_irqrestore(&tr->rlock, flags);

	/* the index sections this read needs, read back from the file if evicted */
	{
		u64 b;

		for (b = p->b0; b <= p->b1 && b < tr->nblocks && !err; b++)
			if (cow_mapped(c, b))
				err = cow_section_need(c, b);
	}
	dbd_bb_init(&bb, tr->bdev, REQ_OP_READ, &p->io);
	mutex_lock(&c->ext_mutex);
	bio_for_each_segment(bv, bio, iter) {
		sector_t s = iter.bi_sector;
		unsigned int off = bv.bv_offset, len = bv.bv_len;

		while (len && !err) {
			u64 b = s / COW_BLOCK_SECTS;
			unsigned int n = min_t(unsigned int, len,
					       (COW_BLOCK_SECTS - (s % COW_BLOCK_SECTS)) << 9);
			bool mapped = b < tr->nblocks && cow_mapped(c, b);
			u64 v = mapped ? cow_entry_peek(c, b) : 0;
			u64 fs;
			unsigned int k;
			bool region = false;

			/*
			 * Sectors of the COW file itself always read as the file
			 * was at snapshot time, even inside a preserved block: a
			 * 4 KiB block can straddle the file (1 KiB-block
			 * filesystems) and its preserved copy may hold header or
			 * data we wrote there later (dormancy, COW data).
			 */
			for (k = 0; k < (n >> 9); k++)
				if (cow_dev_region(c, s + k, &fs)) {
					region = true;
					break;
				}
			if (!region && mapped) {
				err = cow_bb_add_file(c, &bb, v * COW_BLOCK +
						      ((s % COW_BLOCK_SECTS) << 9), bv.bv_page, off, n);
			} else if (!region) {
				dbd_bb_add(&bb, s, bv.bv_page, n, off);
			} else {
				for (k = 0; k < (n >> 9) && !err; k++) {
					if (cow_dev_region(c, s + k, &fs))
						dbd_fill_from_file(c, bv.bv_page, off + (k << 9), fs);
					else if (mapped)
						err = cow_bb_add_file(c, &bb, v * COW_BLOCK +
								      (((s + k) % COW_BLOCK_SECTS) << 9),
								      bv.bv_page, off + (k << 9), 512);
					else
						dbd_bb_add(&bb, s + k, bv.bv_page, 512, off + (k << 9));
				}
			}
			s += n >> 9;
			off += n;
			len -= n;
		}
	}
	dbd_bb_submit(&bb);
	mutex_unlock(&c->ext_mutex);
	if (err)
		p->io.status = err;
	dbd_io_put(&p->io);
}

int dbd_snapdev_create(struct dbd_tracer *tr)
{
	struct gendisk *d = dbd_alloc_disk();

	if (!d)
		return -ENOMEM;
	d->major = dbd_major;
	d->first_minor = tr->minor;
	d->minors = 1;
	d->fops = &dbd_snap_fops;
	d->private_data = tr;
	d->flags |= DBD_GENHD_FL_NO_PART;
	snprintf(d->disk_name, DISK_NAME_LEN, "datto%u", tr->minor);
	set_capacity(d, tr->nr_sects);
	set_disk_ro(d, true);
	tr->disk = d;
	tr->disk_added = false;
	atomic_set(&tr->open_count, 0);
	return 0;
}

int dbd_snapdev_add(struct dbd_tracer *tr)
{
	int err = dbd_add_disk(tr->disk);

	if (!err)
		tr->disk_added = true;
	return err;
}

void dbd_snapdev_destroy(struct dbd_tracer *tr)
{
	if (!tr->disk)
		return;
	dbd_free_disk(tr->disk, tr->disk_added);
	tr->disk = NULL;
	tr->disk_added = false;
}

int dbd_snapdev_init(void)
{
	dbd_major = register_blkdev(0, "datto");
	if (dbd_major < 0)
		return dbd_major;
	return 0;
}

void dbd_snapdev_exit(void)
{
	unregister_blkdev(dbd_major, "datto");
}
