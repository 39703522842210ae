// SPDX-License-Identifier: GPL-2.0
/*
 * The COW file ("exception store").
 *
 * The file lives on the traced filesystem.  It is created, preallocated and
 * zero-filled through the VFS *before* the snapshot is taken, fsync'ed, and
 * its physical layout is captured with bmap().  From then on every access
 * (COW data, index, header) is done with our own bios at those physical
 * sectors, so the COW worker never enters the filesystem and cannot deadlock
 * with journal writes it has to copy itself.  The inode is kept S_IMMUTABLE
 * (in memory) while we hold it, so nobody else can change its layout.
 */
#include <linux/slab.h>
#include <linux/vmalloc.h>
#include <linux/mm.h>
#include <linux/pagemap.h>
#include <linux/namei.h>
#include <linux/dcache.h>
#include <linux/falloc.h>
#include <linux/sort.h>
#include <linux/sched/mm.h>
#include <linux/uio.h>
#include <linux/cred.h>
#include <linux/file.h>
#include "dattobd.h"

/* ---- async I/O helpers --------------------------------------------------- */
void dbd_io_init(struct dbd_io *io)
{
	atomic_set(&io->pending, 1);
	io->status = 0;
	io->done_fn = NULL;
	init_completion(&io->done);
}

static void dbd_io_finish(struct dbd_io *io)
{
	if (io->done_fn)
		io->done_fn(io);
	else
		complete(&io->done);
}

void dbd_io_put(struct dbd_io *io)
{
	if (atomic_dec_and_test(&io->pending))
		dbd_io_finish(io);
}

static void dbd_io_endio(struct bio *bio)
{
	struct dbd_io *io = bio->bi_private;

	if (bio->bi_status)
		io->status = blk_status_to_errno(bio->bi_status);
	bio_put(bio);
	if (atomic_dec_and_test(&io->pending))
		dbd_io_finish(io);
}

int dbd_io_wait(struct dbd_io *io)
{
	if (!atomic_dec_and_test(&io->pending))
		wait_for_completion_io(&io->done);
	return io->status;
}

void dbd_bb_init(struct dbd_bb *bb, struct block_device *bdev, unsigned int opf,
		 struct dbd_io *io)
{
	bb->bdev = bdev;
	bb->opf = opf;
	bb->io = io;
	bb->bio = NULL;
	bb->next = 0;
	bb->tracked = false;
}

void dbd_bb_submit(struct dbd_bb *bb)
{
	struct bio *bio = bb->bio;

	if (!bio)
		return;
	bb->bio = NULL;
	atomic_inc(&bb->io->pending);
	if (bb->tracked)
		dbd_tracked_submit(bio);	/* goes through COW like any other write */
	else
		submit_bio_noacct(bio);
}

#define DBD_BB_VECS 64

void dbd_bb_add(struct dbd_bb *bb, sector_t sect, struct page *pg, unsigned int len,
		unsigned int off)
{
	struct bio *bio;

	if (bb->bio && bb->next == sect && bio_add_page(bb->bio, pg, len, off) == len) {
		bb->next += len >> 9;
		return;
	}
	dbd_bb_submit(bb);
	bio = dbd_bio_alloc(bb->bdev, DBD_BB_VECS, bb->opf, GFP_NOIO);
	bio->bi_iter.bi_sector = sect;
	bio->bi_end_io = dbd_io_endio;
	bio->bi_private = bb->io;
	__bio_add_page(bio, pg, len, off);	/* fresh bio: always fits */
	bb->bio = bio;
	bb->next = sect + (len >> 9);
}

static struct dbd_extent *ext_find(struct dbd_extent *e, unsigned int n, u64 fsect)
{
	unsigned int lo = 0, hi = n;

	while (lo < hi) {
		unsigned int mid = lo + (hi - lo) / 2;

		if (fsect < e[mid].fsect)
			hi = mid;
		else if (fsect >= e[mid].fsect + e[mid].nr)
			lo = mid + 1;
		else
			return &e[mid];
	}
	return NULL;
}

/* queue I/O of [foff, foff+len) of the COW file (512-aligned) on @bb */
int cow_bb_add_file(struct cow_store *c, struct dbd_bb *bb, u64 foff, struct page *pg,
		    unsigned int off, unsigned int len)
{
	while (len) {
		u64 fs = foff >> 9;
		struct dbd_extent *e = ext_find(c->ext, c->n_ext, fs);
		unsigned int n;

		if (!e) {
			LOG_DEBUG("cow file offset %llu is not mapped", foff);
			return -EFBIG;
		}
		n = min_t(u64, len, (e->fsect + e->nr - fs) << 9);
		dbd_bb_add(bb, e->dsect + (fs - e->fsect), pg, n, off);
		foff += n;
		off += n;
		len -= n;
	}
	return 0;
}

/*
 * Mark in @map the device blocks that hold COW data written by us (slots
 * [first data block, fpos)).  Those writes bypass tracking, so without this
 * the next incremental period would not report them although the blocks
 * differ from what the snapshot showed (zeros).
 */
void cow_mark_data_blocks(struct cow_store *c, unsigned long *map, u64 nblocks)
{
	u64 slot;
	unsigned int k;

	mutex_lock(&c->ext_mutex);
	/*
	 * Areas added by expand were written with zeros beneath the snapshot;
	 * the snapshot's view of them changed at that moment, so report them
	 * all as changed (keeps update-img chains byte-exact).
	 */
	for (k = 0; k < c->n_ext; k++) {
		struct dbd_extent *e = &c->ext[k];
		u64 fs, first = c->init_len >> 9;

		for (fs = max(e->fsect, first); fs < e->fsect + e->nr; fs++) {
			u64 b = (e->dsect + (fs - e->fsect)) / COW_BLOCK_SECTS;

			if (b < nblocks)
				set_bit(b, map);
		}
	}
	for (slot = c->first_data_block; slot < c->fpos; slot++) {
		for (k = 0; k < COW_BLOCK_SECTS; k++) {
			struct dbd_extent *e = ext_find(c->ext, c->n_ext, slot * COW_BLOCK_SECTS + k);
			u64 b;

			if (!e)
				continue;
			b = (e->dsect + (slot * COW_BLOCK_SECTS + k - e->fsect)) / COW_BLOCK_SECTS;
			if (b < nblocks)
				set_bit(b, map);
		}
	}
	mutex_unlock(&c->ext_mutex);
}

/*
 * Device block holding the @i-th 4 KiB block of the file's header+index area
 * [0, data_offset); false past it or if unmapped.  We rewrite that area
 * beneath the filesystem (dormancy, activation), which changes what a later
 * snapshot shows, so those blocks must be reported as changed.
 */
bool cow_meta_block(struct cow_store *c, u64 i, u64 *b)
{
	struct dbd_extent *e;

	if (i >= c->data_offset / COW_BLOCK)
		return false;
	mutex_lock(&c->ext_mutex);
	e = ext_find(c->ext, c->n_ext, i * COW_BLOCK_SECTS);
	if (e)
		*b = (e->dsect + (i * COW_BLOCK_SECTS - e->fsect)) / COW_BLOCK_SECTS;
	mutex_unlock(&c->ext_mutex);
	return e && *b < c->ntrack;
}

/* Is device sector @s part of the COW file area as the snapshot sees it? */
bool cow_dev_region(struct cow_store *c, sector_t s, u64 *fsect)
{
	unsigned int lo = 0, hi = c->n_dext;

	while (lo < hi) {
		unsigned int mid = lo + (hi - lo) / 2;
		struct dbd_extent *e = &c->dext[mid];

		if (s < e->dsect)
			hi = mid;
		else if (s >= e->dsect + e->nr)
			lo = mid + 1;
		else {
			*fsect = e->fsect + (s - e->dsect);
			return true;
		}
	}
	return false;
}

/*
 * Submit what @bb holds, drop ext_mutex (taken by the caller to map file
 * offsets) and wait: the first error of mapping (@err) or of the I/O.
 */
static int cow_submit_unlock_wait(struct cow_store *c, struct dbd_bb *bb, struct dbd_io *io, int err)
{
	int e;

	dbd_bb_submit(bb);
	mutex_unlock(&c->ext_mutex);
	e = dbd_io_wait(io);
	return err ? err : e;
}

/* ---- index cache ------------------------------------------------------------ */

/* is block @b preserved (snapshot) or recorded (incremental)?  Lockless, any context */
bool cow_mapped(struct cow_store *c, u64 b)
{
	return b < c->ntrack && test_bit(b, c->mapped);
}

/* entry @b if its section is in memory, else 0 (PENDING entries always are) */
u64 cow_entry_peek(struct cow_store *c, u64 b)
{
	u64 *sec;

	if (b >= c->ntrack)
		return 0;
	sec = c->sections[b / COW_SECT_ENTRIES];
	return sec ? sec[b % COW_SECT_ENTRIES] : 0;
}

/*
 * Sections are read and written through the file's captured extents.
 * @sec is a kvmalloc'ed 32 KiB buffer: vmalloc or (physically contiguous)
 * kmalloc memory, so each page is looked up on its own.
 */
static void cow_section_add(struct cow_store *c, struct dbd_bb *bb, u64 s, u8 *sec, int *err)
{
	unsigned int off;

	for (off = 0; off < COW_SECT_BYTES && !*err; off += PAGE_SIZE) {
		struct page *pg = is_vmalloc_addr(sec + off) ? vmalloc_to_page(sec + off) :
						      virt_to_page(sec + off);

		*err = cow_bb_add_file(c, bb, COW_BLOCK + s * COW_SECT_BYTES + off, pg, 0, PAGE_SIZE);
	}
}

/*
 * A section buffer for the worker, which must not recurse into I/O (it may be
 * what the I/O waits for): NOIO scope rather than GFP_NOIO, so that kvmalloc
 * may still fall back to vmalloc when 32 KiB are not contiguous.
 */
static u64 *cow_section_alloc(void)
{
	unsigned int noio = memalloc_noio_save();
	u64 *sec = kvzalloc(COW_SECT_BYTES, GFP_KERNEL);

	memalloc_noio_restore(noio);
	return sec;
}

/* read evicted section @s back from the file (worker context, ext_mutex not held) */
static int cow_section_load(struct cow_store *c, u64 s)
{
	struct dbd_io io;
	struct dbd_bb bb;
	u64 *sec = cow_section_alloc();
	int err = 0;

	if (!sec)
		return -ENOMEM;
	dbd_io_init(&io);
	dbd_bb_init(&bb, c->bdev, REQ_OP_READ, &io);
	mutex_lock(&c->ext_mutex);
	cow_section_add(c, &bb, s, (u8 *)sec, &err);
	err = cow_submit_unlock_wait(c, &bb, &io, err);
	if (err) {
		kvfree(sec);
		LOG_ERROR(err, "error reading cow index section %llu back from the file", s);
		return err;
	}
	c->sections[s] = sec;
	clear_bit(s, c->on_disk);
	c->nresident++;
	c->nr_loaded++;
	c->hits[s] = 1;
	return 0;
}

/* make the section holding entry @b resident (worker context, ext_mutex not held) */
int cow_section_need(struct cow_store *c, u64 b)
{
	u64 s = b / COW_SECT_ENTRIES;

	if (b >= c->ntrack)
		return 0;
	if (c->sections[s]) {
		c->hits[s]++;
		return 0;
	}
	return test_bit(s, c->on_disk) ? cow_section_load(c, s) : 0;
}

/*
 * Set entry @b (worker context).  An evicted section is read back first, so
 * ext_mutex must not be held unless the section is known to be resident
 * (PENDING entries: a section is only evicted between worker batches).
 */
int cow_entry_set(struct cow_store *c, u64 b, u64 v)
{
	u64 s = b / COW_SECT_ENTRIES;
	u64 *sec;
	int err;

	if (b >= c->ntrack)
		return -ERANGE;
	if (!c->sections[s]) {
		if (test_bit(s, c->on_disk)) {
			err = cow_section_load(c, s);
			if (err)
				return err;
		} else {
			if (!v)
				return 0;
			sec = cow_section_alloc();
			if (!sec)
				return -ENOMEM;
			c->sections[s] = sec;
			c->nresident++;
		}
	}
	sec = c->sections[s];
	c->hits[s]++;
	sec[b % COW_SECT_ENTRIES] = v;
	__set_bit(s, c->dirty);
	/* after the COW data is durable (dbd_preserve): the hook may now skip @b */
	if (v && !(v & COW_PENDING))
		set_bit(b, c->mapped);
	else
		clear_bit(b, c->mapped);
	return 0;
}

/*
 * Sections the cache may hold for a cache size of @bytes: the same rule as
 * upstream (spec 4.6), max(0, bytes - 24 * nsect) / 32 KiB.  0 is allowed:
 * then every section is written back after each batch of writes.
 */
void cow_set_cache(struct cow_store *c, unsigned long bytes)
{
	u64 fixed = 24 * c->nsect;

	WRITE_ONCE(c->max_resident, bytes > fixed ? (bytes - fixed) / COW_SECT_BYTES : 0);
}

struct cow_victim {
	u32 hits;
	u64 s;
};

static int cow_victim_cmp(const void *a, const void *b)
{
	const struct cow_victim *x = a, *y = b;

	if (x->hits != y->hits)
		return x->hits < y->hits ? -1 : 1;
	return x->s < y->s ? -1 : (x->s > y->s);
}

/*
 * Over the limit: write back and free the less-used half of the resident
 * sections (at least down to the limit), as upstream does.  With
 * !@write_dirty only sections identical to the file's index are dropped
 * (incremental mode: writing the index would change blocks that the change
 * list must then report).  @tracked as for cow_finalize().  Worker context,
 * or with the worker paused.
 */
int cow_cache_trim(struct cow_store *c, bool write_dirty, bool tracked)
{
	struct cow_victim *v;
	struct dbd_io io;
	struct dbd_bb bb;
	unsigned int noio;
	u64 limit = READ_ONCE(c->max_resident), keep, n = 0, nv, s, i;
	bool wrote = false;
	int err = 0;

	if (c->nresident <= limit)
		return 0;
	noio = memalloc_noio_save();
	v = kvmalloc_array(c->nresident, sizeof(*v), GFP_KERNEL);
	memalloc_noio_restore(noio);
	if (!v)
		return 0;	/* try again after the next batch */
	for (s = 0; s < c->nsect && n < c->nresident; s++)
		if (c->sections[s] && (write_dirty || !test_bit(s, c->dirty)))
			v[n++] = (struct cow_victim){ .hits = c->hits[s], .s = s };
	if (!n) {		/* incremental mode, every resident section dirty: kept till finalize */
		kvfree(v);
		return 0;
	}
	sort(v, n, sizeof(*v), cow_victim_cmp, NULL);
	keep = min(limit, c->nresident / 2);
	nv = min(n, c->nresident - keep);

	dbd_io_init(&io);
	dbd_bb_init(&bb, c->bdev, REQ_OP_WRITE, &io);
	bb.tracked = tracked;
	mutex_lock(&c->ext_mutex);
	for (i = 0; i < nv && !err; i++) {
		if (test_bit(v[i].s, c->dirty)) {
			cow_section_add(c, &bb, v[i].s, (u8 *)c->sections[v[i].s], &err);
			wrote = true;
		}
	}
	err = cow_submit_unlock_wait(c, &bb, &io, err);
	if (err) {
		LOG_ERROR(err, "error writing back cow index sections");
		kvfree(v);
		return err;
	}
	if (wrote && !tracked)
		c->meta_written = true;
	for (i = 0; i < nv; i++) {
		s = v[i].s;
		kvfree(c->sections[s]);
		c->sections[s] = NULL;
		__clear_bit(s, c->dirty);
		set_bit(s, c->on_disk);
		c->nresident--;
	}
	c->nr_evicted += nv;
	for (s = 0; s < c->nsect; s++)
		c->hits[s] >>= 1;	/* age: recent use counts more */
	kvfree(v);
	return 0;
}

/* ---- file helpers ---------------------------------------------------------- */
static void cow_fill_header(struct cow_store *c, struct cow_header *h, u32 flags)
{
	memset(h, 0, sizeof(*h));
	h->magic = COW_MAGIC;
	h->flags = flags;
	h->fpos = c->fpos;
	h->fsize = c->fsize;
	h->seqid = c->seqid;
	memcpy(h->uuid, c->uuid, 16);
	h->version = c->version;
	h->nr_changed_blocks = atomic64_read(&c->nr_changed);
}

static int cow_zero_fill(struct file *f, loff_t start, loff_t end)
{
	size_t bufsz = 1 << 20;
	void *buf = vzalloc(bufsz);
	loff_t pos = start;
	int err = 0;

	if (!buf)
		return -ENOMEM;
	while (pos < end) {
		size_t n = min_t(loff_t, bufsz, end - pos);
		ssize_t w = kernel_write(f, buf, n, &pos);

		if (w < 0) {
			err = w;
			break;
		}
		if (w == 0) {
			err = -EIO;
			break;
		}
		if (fatal_signal_pending(current)) {
			err = -EINTR;
			break;
		}
	}
	vfree(buf);
	return err;
}

/*
 * Zero-fill with O_DIRECT writes of the shared zero page (expand while a
 * snapshot is live): no page cache, so no dirty throttling that could wait
 * for writeback queued behind the COW worker, and the bios are issued by this
 * task, which the hook lets through.  Falls back to buffered writes.
 */
#define DBD_ZF_PAGES 256
static int cow_zero_fill_direct(struct file *f, loff_t start, loff_t end)
{
	struct bio_vec *bv;
	struct file *df;
	loff_t pos = start;
	unsigned int i;
	int err = 0;

	df = dentry_open(&f->f_path, O_RDWR | O_DIRECT | O_LARGEFILE, current_cred());
	if (IS_ERR(df))
		return cow_zero_fill(f, start, end);
	bv = kmalloc_array(DBD_ZF_PAGES, sizeof(*bv), GFP_KERNEL);
	if (!bv) {
		fput(df);
		return -ENOMEM;
	}
	for (i = 0; i < DBD_ZF_PAGES; i++) {
		bv[i].bv_page = ZERO_PAGE(0);
		bv[i].bv_len = PAGE_SIZE;
		bv[i].bv_offset = 0;
	}
	while (pos < end) {
		size_t n = min_t(loff_t, (loff_t)DBD_ZF_PAGES * PAGE_SIZE, end - pos);
		struct iov_iter it;
		ssize_t w;

		iov_iter_bvec(&it, WRITE, bv, DIV_ROUND_UP(n, PAGE_SIZE), n);
		w = vfs_iter_write(df, &it, &pos, 0);
		if (w <= 0) {
			err = w < 0 ? w : -EIO;
			break;
		}
	}
	kfree(bv);
	fput(df);
	if (err == -EINVAL || err == -EOPNOTSUPP)	/* no O_DIRECT support */
		err = cow_zero_fill(f, pos, end);
	return err;
}

static int ext_cmp_dev(const void *a, const void *b)
{
	const struct dbd_extent *x = a, *y = b;

	return x->dsect < y->dsect ? -1 : x->dsect > y->dsect;
}

/*
 * Map file bytes [start, end) with bmap() and append merged extents to
 * c->ext.  Every block must be mapped (no holes/unwritten/delalloc).
 */
static int cow_map_range(struct cow_store *c, struct inode *inode, u64 start, u64 end)
{
	unsigned int bits = inode->i_blkbits;
	u64 spb = 1ULL << (bits - 9);
	u64 blk, first = start >> bits, last = (end + (1ULL << bits) - 1) >> bits;
	unsigned int cap = c->n_ext + 16;
	struct dbd_extent *e = kvmalloc_array(cap, sizeof(*e), GFP_KERNEL);
	unsigned int n = c->n_ext;

	if (!e)
		return -ENOMEM;
	if (n)
		memcpy(e, c->ext, n * sizeof(*e));
	for (blk = first; blk < last; blk++) {
		sector_t pb = blk;
		int r = bmap(inode, &pb);

		if (r || pb == 0) {
			LOG_ERROR(-EIO, "cow file block %llu is not mapped", blk);
			kvfree(e);
			return -EIO;
		}
		if (n && e[n - 1].fsect + e[n - 1].nr == blk * spb &&
		    e[n - 1].dsect + e[n - 1].nr == (u64)pb * spb) {
			e[n - 1].nr += spb;
			continue;
		}
		if (n == cap) {
			struct dbd_extent *ne = kvmalloc_array(cap * 2, sizeof(*e), GFP_KERNEL);

			if (!ne) {
				kvfree(e);
				return -ENOMEM;
			}
			memcpy(ne, e, n * sizeof(*e));
			kvfree(e);
			e = ne;
			cap *= 2;
		}
		e[n].fsect = blk * spb;
		e[n].dsect = (u64)pb * spb;
		e[n].nr = spb;
		n++;
		if (!(blk & 1023))
			cond_resched();
	}
	kvfree(c->ext);
	c->ext = e;
	c->n_ext = n;
	return 0;
}

static int cow_rebuild_dext(struct cow_store *c)
{
	struct dbd_extent *d = kvmalloc_array(max(c->n_ext, 1U), sizeof(*d), GFP_KERNEL);

	if (!d)
		return -ENOMEM;
	memcpy(d, c->ext, c->n_ext * sizeof(*d));
	sort(d, c->n_ext, sizeof(*d), ext_cmp_dev, NULL);
	kvfree(c->dext);
	c->dext = d;
	c->n_dext = c->n_ext;
	return 0;
}

/* path of @f relative to the root of its filesystem, starting with '/' */
static int cow_path_in_fs(struct file *f, char **out)
{
	char *buf = kmalloc(PATH_MAX, GFP_KERNEL);
	char *p;

	if (!buf)
		return -ENOMEM;
	p = dentry_path_raw(f->f_path.dentry, buf, PATH_MAX);
	if (IS_ERR(p)) {
		kfree(buf);
		return PTR_ERR(p);
	}
	*out = kstrdup(p, GFP_KERNEL);
	kfree(buf);
	return *out ? 0 : -ENOMEM;
}

/* geometry and in-memory index for a device of @nr_sects sectors */
/*
 * Blocks we track on a device of @nr_sects: every whole 4 KiB block, plus a
 * partial last block (a partition whose size is not a multiple of 4 KiB) as
 * entry nblocks whenever the index has room for it, which it has unless
 * nblocks is a multiple of the 4096 entries of a section (the index size is
 * fixed by the format: ceil(nblocks / 4096) sections).  Upstream also uses
 * entry nblocks for that block (spec 4.5 rule 5).
 */
u64 cow_tracked_blocks(sector_t nr_sects)
{
	u64 whole = nr_sects / COW_BLOCK_SECTS;
	u64 room = max_t(u64, DIV_ROUND_UP(whole, COW_SECT_ENTRIES), 1) * COW_SECT_ENTRIES;

	return whole + ((nr_sects % COW_BLOCK_SECTS) && whole < room ? 1 : 0);
}

/* a bitmap of @bits bits, zeroed, that may be large (one bit per block or data slot) */
static unsigned long *bitmap_zalloc_node_kv(u64 bits)
{
	return kvzalloc(max_t(u64, BITS_TO_LONGS(bits), 1) * sizeof(unsigned long), GFP_KERNEL);
}

static struct cow_store *cow_alloc(struct block_device *bdev, sector_t nr_sects)
{
	struct cow_store *c = kzalloc(sizeof(*c), GFP_KERNEL);

	if (!c)
		return NULL;
	mutex_init(&c->ext_mutex);
	c->bdev = bdev;
	c->nblocks = nr_sects / COW_BLOCK_SECTS;
	c->ntrack = cow_tracked_blocks(nr_sects);
	c->nsect = DIV_ROUND_UP(c->nblocks, COW_SECT_ENTRIES);
	if (!c->nsect)
		c->nsect = 1;
	c->data_offset = COW_BLOCK + c->nsect * COW_SECT_BYTES;
	c->first_data_block = c->data_offset / COW_BLOCK;
	c->fpos = c->first_data_block;
	c->version = 1;
	atomic64_set(&c->nr_changed, 0);
	c->sections = kvcalloc(c->nsect, sizeof(u64 *), GFP_KERNEL);
	c->mapped = bitmap_zalloc_node_kv(c->ntrack);
	c->on_disk = bitmap_zalloc_node_kv(c->nsect);
	c->dirty = bitmap_zalloc_node_kv(c->nsect);
	c->hits = kvcalloc(c->nsect, sizeof(u32), GFP_KERNEL);
	c->max_resident = U64_MAX;	/* until cow_set_cache() */
	c->hdr0 = kzalloc(COW_BLOCK, GFP_KERNEL);
	if (!c->sections || !c->mapped || !c->on_disk || !c->dirty || !c->hits || !c->hdr0) {
		cow_free(c);
		return NULL;
	}
	return c;
}

/* hold the inode (and S_IMMUTABLE on it) while the filesystem is mounted */
int cow_pin(struct cow_store *c, struct file *f)
{
	if (c->pin)
		return 0;
	return dbd_pin_inode(file_inode(f), &c->pin);
}

void cow_unpin(struct cow_store *c)
{
	dbd_unpin(c->pin);
	c->pin = NULL;
}

/*
 * Create a new COW file (setup steps 6-9 and the physical capture).  The
 * file is closed again before returning; only its inode stays pinned.
 * *relpath gets the file's path relative to its filesystem's root.
 * On error *errp is set and NULL returned; the file is removed if it was
 * created by us (regular file).
 */
struct cow_store *cow_create(struct block_device *bdev, sector_t nr_sects, const char *path,
			     u64 fsize, u64 falloc_mib, u64 seqid, const u8 *uuid, char **relpath,
			     int *errp)
{
	struct cow_store *c;
	struct file *f;
	struct cow_header *h;
	int err;

	f = filp_open(path, O_RDWR | O_CREAT | O_TRUNC | O_LARGEFILE, 0);
	if (IS_ERR(f)) {
		*errp = PTR_ERR(f);
		LOG_ERROR(*errp, "error opening cow file '%s'", path);
		return NULL;
	}
	if (!S_ISREG(file_inode(f)->i_mode)) {
		filp_close(f, NULL);
		*errp = -EINVAL;
		LOG_ERROR(-EINVAL, "cow file '%s' is not a regular file", path);
		return NULL;
	}

	c = cow_alloc(bdev, nr_sects);
	if (!c) {
		err = -ENOMEM;
		goto fail_file;
	}
	c->fsize = fsize;
	c->seqid = seqid;
	memcpy(c->uuid, uuid, 16);
	c->falloc_mib = falloc_mib;
	c->alloc_len = round_up(max(fsize, c->data_offset), COW_BLOCK);
	c->init_len = c->alloc_len;

	/* step 7: real preallocation (mode 0 extends the file) */
	err = vfs_fallocate(f, 0, 0, c->alloc_len);
	if (err && err != -EOPNOTSUPP) {
		LOG_ERROR(err, "error preallocating cow file");
		goto fail;
	}

	/* step 8: dirty header */
	h = c->hdr0;
	cow_fill_header(c, h, 0);
	{
		loff_t pos = 0;
		ssize_t w = kernel_write(f, c->hdr0, COW_BLOCK, &pos);

		if (w != COW_BLOCK) {
			err = w < 0 ? w : -EIO;
			LOG_ERROR(err, "error writing cow header");
			goto fail;
		}
	}

	/* step 9: must live on the traced filesystem */
	if (file_inode(f)->i_sb != dbd_bdev_super(bdev) || file_inode(f)->i_sb->s_bdev != bdev) {
		err = -EINVAL;
		LOG_ERROR(err, "cow file must be on the traced filesystem");
		goto fail;
	}

	/* turn the preallocation into real written extents, then capture them */
	err = cow_zero_fill(f, COW_BLOCK, c->alloc_len);
	if (err) {
		LOG_ERROR(err, "error zero-filling cow file");
		goto fail;
	}
	err = vfs_fsync(f, 0);
	if (err) {
		LOG_ERROR(err, "error syncing cow file");
		goto fail;
	}
	err = cow_map_range(c, file_inode(f), 0, c->alloc_len);
	if (!err)
		err = cow_rebuild_dext(c);
	if (!err)
		err = cow_path_in_fs(f, relpath);
	if (!err)
		err = cow_pin(c, f);
	if (err)
		goto fail;
	LOG_DEBUG("cow file '%s': %llu bytes, %u extents, data offset %llu", path,
		  c->alloc_len, c->n_ext, c->data_offset);
	filp_close(f, NULL);
	*errp = 0;
	return c;

fail:
	cow_free(c);
fail_file:
	dbd_vfs_unlink(f);
	filp_close(f, NULL);
	*errp = err;
	return NULL;
}

/*
 * Index entries of a reloaded file (spec 4.5): snapshot entries are 0 or a
 * data slot in [first_data_block, fpos) that no other block uses;
 * incremental entries are 0, the marker 1, or a slot below fpos (kept from
 * the snapshot period before the transition; the data itself was truncated).  A corrupt index must be refused here: a
 * slot outside the written area would be read as the snapshot's data.
 */
static int cow_check_section(struct cow_store *c, u64 s, const u64 *ent, unsigned long *used,
			     bool snap)
{
	u64 i, first = s * COW_SECT_ENTRIES;

	for (i = 0; i < COW_SECT_ENTRIES && first + i < c->ntrack; i++) {
		u64 v = le64_to_cpu(ent[i]);

		if (!v || (!snap && v == 1))
			continue;
		if (v < c->first_data_block || v >= max(c->fpos, c->first_data_block)) {
			LOG_ERROR(-EINVAL, "cow index entry of block %llu points outside the data area (%llu)",
				  first + i, v);
			return -EINVAL;
		}
		if (used && __test_and_set_bit(v - c->first_data_block, used)) {
			LOG_ERROR(-EINVAL, "cow index entries share data slot %llu (block %llu)", v, first + i);
			return -EINVAL;
		}
	}
	return 0;
}

/*
 * Load an existing, cleanly closed COW file for activation of a reloaded
 * tracer (spec 4.4 "reload or reopen").  Reads the header and index through
 * the VFS (nothing else has the file open yet), captures its layout.
 */
struct cow_store *cow_load(struct block_device *bdev, sector_t nr_sects, struct file *f, bool snap,
			   unsigned long cache_bytes, int *errp)
{
	struct inode *inode = file_inode(f);
	struct cow_store *c = cow_alloc(bdev, nr_sects);
	struct cow_header *h;
	loff_t size = i_size_read(inode), pos;
	void *buf = NULL;
	unsigned long *used = NULL;
	u64 s, i;
	int err;

	if (!c) {
		*errp = -ENOMEM;
		return NULL;
	}
	cow_set_cache(c, cache_bytes);
	buf = kvmalloc(COW_SECT_BYTES, GFP_KERNEL);
	if (!buf) {
		err = -ENOMEM;
		goto fail;
	}
	pos = 0;
	if (kernel_read(f, buf, COW_BLOCK, &pos) != COW_BLOCK) {
		err = -EINVAL;
		LOG_ERROR(err, "cow file is too short for a header");
		goto fail;
	}
	h = buf;
	if (h->magic != COW_MAGIC) {
		err = -EINVAL;
		LOG_ERROR(err, "cow file has a bad magic number (%u)", h->magic);
		goto fail;
	}
	if (!(h->flags & COW_CLEAN)) {
		err = -EINVAL;
		LOG_ERROR(err, "cow file was not closed cleanly (crash or power loss while active?): a new full snapshot is needed");
		goto fail;
	}
	if (!!(h->flags & COW_INDEX_ONLY) != !snap) {
		err = -EINVAL;
		LOG_ERROR(err, "cow file is in %s mode but was reloaded as %s",
			  (h->flags & COW_INDEX_ONLY) ? "incremental" : "snapshot",
			  snap ? "snapshot" : "incremental");
		goto fail;
	}
	c->fpos = h->fpos;
	c->fsize = h->fsize;
	c->seqid = h->seqid;
	memcpy(c->uuid, h->uuid, 16);
	c->version = h->version;
	atomic64_set(&c->nr_changed, h->nr_changed_blocks);
	c->flags = h->flags & ~COW_CLEAN;
	/*
	 * fpos only means something while there is a data area (snapshot
	 * mode).  The length need not be a multiple of 4 KiB: upstream makes
	 * its files exactly fsize long (10 % of a device, in bytes).  Slots
	 * end at or below fsize, so only the whole 4 KiB blocks are ours.
	 */
	if (size < c->data_offset || c->fsize < c->data_offset ||
	    c->fsize > size ||
	    (snap && (c->fpos < c->first_data_block || c->fpos > c->fsize / COW_BLOCK))) {
		err = -EINVAL;
		LOG_ERROR(err, "cow file does not fit this device (size %lld, fsize %llu, fpos %llu, index end %llu)",
			  (long long)size, c->fsize, c->fpos, c->data_offset);
		goto fail;
	}
	c->alloc_len = round_down(size, COW_BLOCK);
	c->init_len = c->alloc_len;
	c->falloc_mib = c->fsize >> 20;
	/* the file as it looked when the snapshot was taken (initial header, zeros) */
	{
		u64 fpos = c->fpos, nr = atomic64_read(&c->nr_changed);

		c->fpos = c->first_data_block;
		atomic64_set(&c->nr_changed, 0);
		cow_fill_header(c, c->hdr0, 0);
		c->fpos = fpos;
		atomic64_set(&c->nr_changed, nr);
	}
	if (snap) {
		used = bitmap_zalloc_node_kv(c->fpos - c->first_data_block);
		if (!used) {
			err = -ENOMEM;
			goto fail;
		}
	}
	for (s = 0; s < c->nsect; s++) {
		u64 *sec;

		pos = COW_BLOCK + s * COW_SECT_BYTES;
		if (kernel_read(f, buf, COW_SECT_BYTES, &pos) != COW_SECT_BYTES) {
			err = -EIO;
			LOG_ERROR(err, "error reading cow index section %llu", s);
			goto fail;
		}
		if (!memchr_inv(buf, 0, COW_SECT_BYTES))
			continue;
		err = cow_check_section(c, s, buf, used, snap);
		if (err)
			goto fail;
		for (i = 0; i < COW_SECT_ENTRIES && s * COW_SECT_ENTRIES + i < c->ntrack; i++)
			if (((u64 *)buf)[i])
				__set_bit(s * COW_SECT_ENTRIES + i, c->mapped);
		cond_resched();
		/* beyond the cache limit a section stays in the file until needed */
		if (c->nresident >= c->max_resident) {
			__set_bit(s, c->on_disk);
			continue;
		}
		sec = kvmalloc(COW_SECT_BYTES, GFP_KERNEL);
		if (!sec) {
			err = -ENOMEM;
			goto fail;
		}
		memcpy(sec, buf, COW_SECT_BYTES);
		c->sections[s] = sec;
		c->nresident++;
	}
	kvfree(used);
	used = NULL;
	err = cow_map_range(c, inode, 0, c->alloc_len);
	if (!err)
		err = cow_rebuild_dext(c);
	if (err)
		goto fail;
	kvfree(buf);
	*errp = 0;
	return c;
fail:
	kvfree(used);
	kvfree(buf);
	cow_free(c);
	*errp = err;
	return NULL;
}

/* is @f still exactly the file whose blocks we write (dormant -> active)? */
int cow_same_layout(struct cow_store *c, struct file *f)
{
	struct cow_store *t;
	int err;

	if (round_down(i_size_read(file_inode(f)), COW_BLOCK) != c->alloc_len)
		return -EINVAL;
	t = cow_alloc(c->bdev, 0);
	if (!t)
		return -ENOMEM;
	err = cow_map_range(t, file_inode(f), 0, c->alloc_len);
	if (!err) {
		mutex_lock(&c->ext_mutex);
		if (t->n_ext != c->n_ext || memcmp(t->ext, c->ext, c->n_ext * sizeof(*t->ext)))
			err = -EINVAL;
		mutex_unlock(&c->ext_mutex);
	}
	cow_free(t);
	return err;
}

/*
 * Write the index and then the header (flags) by bio.  Fold the incremental
 * bitmap in first.  With @tracked the bios are submitted through the COW path
 * (the file is part of a newer snapshot).
 */
int cow_finalize(struct cow_store *c, u32 flags, unsigned long *changed, bool tracked)
{
	struct dbd_io io;
	struct dbd_bb bb;
	u64 s, b;
	int err = 0;

	/* section by section, so that no more than the cache limit is resident */
	for (s = 0; changed && s < c->nsect; s++) {
		u64 end = min((s + 1) * COW_SECT_ENTRIES, c->ntrack);

		for (b = find_next_bit(changed, end, s * COW_SECT_ENTRIES); b < end;
		     b = find_next_bit(changed, end, b + 1)) {
			if (cow_mapped(c, b))
				continue;
			err = cow_entry_set(c, b, 1);
			if (err)
				return err;
		}
		err = cow_cache_trim(c, true, tracked);
		if (err)
			return err;
		cond_resched();
	}
	c->flags = flags;
	if (!tracked)
		c->meta_written = true;
	dbd_io_init(&io);
	dbd_bb_init(&bb, c->bdev, REQ_OP_WRITE, &io);
	bb.tracked = tracked;
	mutex_lock(&c->ext_mutex);
	for (s = 0; s < c->nsect && !err; s++)
		if (c->sections[s])
			cow_section_add(c, &bb, s, (u8 *)c->sections[s], &err);
	err = cow_submit_unlock_wait(c, &bb, &io, err);
	if (err) {
		LOG_ERROR(err, "error writing cow index");
		return err;
	}
	bitmap_zero(c->dirty, c->nsect);

	return cow_write_header(c, flags, tracked);
}

/* write the header with @flags (FUA), by bio */
/* make every write that completed before this call durable (an empty PREFLUSH, no data) */
static int cow_flush_device(struct block_device *bdev)
{
	struct bio *bio = dbd_bio_alloc(bdev, 0, REQ_OP_WRITE | REQ_PREFLUSH, GFP_KERNEL);
	int err;

	if (!bio)
		return -ENOMEM;
	err = submit_bio_wait(bio);
	bio_put(bio);
	return err;
}

int cow_write_header(struct cow_store *c, u32 flags, bool tracked)
{
	struct dbd_io io;
	struct dbd_bb bb;
	struct page *hp;
	int err;

	hp = alloc_page(GFP_KERNEL | __GFP_ZERO);
	if (!hp)
		return -ENOMEM;
	{
		void *a = dbd_kmap(hp);

		cow_fill_header(c, a, flags);
		dbd_kunmap(a);
	}
	if (!tracked)
		c->meta_written = true;
	/*
	 * A CLEAN header promises a complete index: the index sections written
	 * before it must be durable first (found by write-point replay: a crash
	 * could leave CLEAN with an all-zero index).  An empty flush, not
	 * PREFLUSH on the header itself: dm resubmits a flush-with-data's data
	 * part from its own context, where the hook would take it for an origin
	 * write.  FUA makes the header durable before we go on, which a dirty
	 * header needs so that later index changes never precede it on disk.
	 */
	if (flags & COW_CLEAN) {
		err = cow_flush_device(c->bdev);
		if (err) {
			__free_page(hp);
			LOG_ERROR(err, "error flushing the cow index before its clean header");
			return err;
		}
	}
	dbd_io_init(&io);
	dbd_bb_init(&bb, c->bdev, REQ_OP_WRITE | REQ_FUA, &io);
	bb.tracked = tracked;
	mutex_lock(&c->ext_mutex);
	err = cow_bb_add_file(c, &bb, 0, hp, 0, PAGE_SIZE);
	err = cow_submit_unlock_wait(c, &bb, &io, err);
	__free_page(hp);
	if (err)
		LOG_ERROR(err, "error writing cow header");
	else
		c->clean_on_disk = flags & COW_CLEAN;
	/* readers through the VFS must see what we wrote beneath the page cache */
	dbd_pin_invalidate(c->pin);
	return err;
}

/* write @n pages to data slots fpos.. of the file and wait (no index update) */
int cow_write_slots(struct cow_store *c, struct page **pages, unsigned int n, u64 fpos)
{
	struct dbd_io io;
	struct dbd_bb bb;
	unsigned int i;
	int err = 0, e;

	dbd_io_init(&io);
	dbd_bb_init(&bb, c->bdev, REQ_OP_WRITE, &io);
	for (i = 0; i < n && !err; i++)
		err = cow_bb_add_file(c, &bb, (fpos + i) * COW_BLOCK, pages[i], 0, PAGE_SIZE);
	dbd_bb_submit(&bb);
	e = dbd_io_wait(&io);
	return err ? err : e;
}

/* transition to incremental: drop the data area (a failure is only a warning) */
void cow_truncate_to_index(struct cow_store *c, struct file *f)
{
	long err = PTR_ERR_OR_ZERO(f);
	unsigned int i;

	if (!err) {
		dbd_set_immutable(file_inode(f), false);
		err = vfs_truncate(&f->f_path, c->data_offset);
		dbd_set_immutable(file_inode(f), true);
	}
	if (err)
		LOG_WARN("truncating cow file failed: %ld", err);
	mutex_lock(&c->ext_mutex);
	c->flags |= COW_INDEX_ONLY;
	c->fsize = c->data_offset;
	if (!err) {
		u64 lim = c->data_offset >> 9;

		for (i = 0; i < c->n_ext; i++) {
			if (c->ext[i].fsect >= lim) {
				c->n_ext = i;
				break;
			}
			if (c->ext[i].fsect + c->ext[i].nr > lim)
				c->ext[i].nr = lim - c->ext[i].fsect;
		}
		c->alloc_len = c->data_offset;
	}
	mutex_unlock(&c->ext_mutex);
}

void cow_free(struct cow_store *c)
{
	u64 s;

	if (!c)
		return;
	cow_unpin(c);
	if (c->sections) {
		for (s = 0; s < c->nsect; s++)
			kvfree(c->sections[s]);
		kvfree(c->sections);
	}
	kvfree(c->mapped);
	kvfree(c->on_disk);
	kvfree(c->dirty);
	kvfree(c->hits);
	kvfree(c->ext);
	kvfree(c->dext);
	kfree(c->hdr0);
	kfree(c);
}

/*
 * Grow the file by @bytes at its end (expand-cow-file).  The zero-fill is
 * written by this task; the hook lets tr->expand_task's writes through
 * without copy-on-write and the new area reads as zeros in the snapshot.
 */
int cow_expand(struct dbd_tracer *tr, struct cow_store *c, struct file *f, u64 bytes)
{
	u64 start = c->alloc_len, end;
	int err;

	bytes = round_down(bytes, COW_BLOCK);
	if (!bytes)
		return 0;
	end = start + bytes;
	dbd_set_immutable(file_inode(f), false);
	err = vfs_fallocate(f, 0, start, bytes);
	if (err && err != -EOPNOTSUPP)
		goto out;
	/*
	 * Written back without copy-on-write (the hook recognizes this task
	 * and the file's page cache).  No fsync: waiting for a journal commit
	 * could wait for the COW worker.  Written-back data is enough for the
	 * filesystem to report the blocks as mapped.
	 */
	WRITE_ONCE(tr->cow_mapping, f->f_mapping);
	WRITE_ONCE(tr->expand_task, current);
	err = cow_zero_fill_direct(f, start, end);
	if (!err)
		err = filemap_write_and_wait_range(f->f_mapping, start, end - 1);
	WRITE_ONCE(tr->expand_task, NULL);
	WRITE_ONCE(tr->cow_mapping, NULL);
	if (err)
		goto out;
	mutex_lock(&c->ext_mutex);
	err = cow_map_range(c, file_inode(f), start, end);
	if (!err)
		err = cow_rebuild_dext(c);
	if (!err) {
		c->alloc_len = end;
		c->fsize += bytes;
	}
	mutex_unlock(&c->ext_mutex);
out:
	dbd_set_immutable(file_inode(f), true);
	return err;
}
