// SPDX-License-Identifier: GPL-2.0
/*
 * The COW file ("exception store").
 *
 * The file lives on the traced filesystem.  It is created and preallocated
 * through the VFS *before* the snapshot is taken: fallocate() reserves its
 * blocks without writing them (unwritten extents), only the header block and
 * the last block are written, and the layout, unwritten extents included, is
 * captured with the filesystem's fiemap.  From then on every access (COW
 * data, index, header) is done with our own bios at those physical sectors,
 * so the COW worker never enters the filesystem and cannot deadlock with
 * journal writes it has to copy itself.  The inode is kept S_IMMUTABLE (in
 * memory) while we hold it, so nobody else can change its layout.
 *
 * What lies beneath an unwritten extent is invisible to the filesystem (a
 * read returns zeros) and must never be converted by it: a conversion may
 * zero the rest of the extent (ext4 does, to save extent splits), which would
 * destroy what we wrote there.  So the file is never written through the VFS
 * once we write to it beneath the filesystem, except for expansions, which
 * only write blocks added after the written last block (see cow_expand()).
 * For update-img the index is handed over in a new file written through the
 * VFS (cow_handover()); for our own reload the header block carries the
 * section map (COW_SMAP_*), since a never-written section holds stale data.
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
#include <linux/fiemap.h>
#include <linux/mman.h>
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
}

void dbd_bb_submit(struct dbd_bb *bb)
{
	struct bio *bio = bb->bio;

	if (!bio)
		return;
	bb->bio = NULL;
	atomic_inc(&bb->io->pending);
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
	return b < c->ntrack && dbd_blkmap_test(c->mapped, b);
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

/* ---- section map --------------------------------------------------------- */
static u64 cow_smap_group(u64 nsect)
{
	return max_t(u64, 1, DIV_ROUND_UP(nsect, (u64)COW_SMAP_BITS));
}

static u64 cow_group_of(struct cow_store *c, u64 s)
{
	return div64_u64(s, c->group);
}

/*
 * Before the first write of a section of group @g beneath the filesystem,
 * the group's other sections must read as zeros there too (until then they
 * hold whatever the disk held): queue zero writes for those that are neither
 * in memory nor on disk.  Resident ones are dirty (written before the header
 * is marked clean) or were read from the device.  The caller sets the bit
 * once the writes completed.
 */
static void cow_group_zero(struct cow_store *c, struct dbd_bb *bb, u64 g, int *err)
{
	u64 s, end = min((g + 1) * c->group, c->nsect);
	unsigned int off;

	for (s = g * c->group; s < end && !*err; s++) {
		if (c->sections[s] || test_bit(s, c->on_disk))
			continue;
		for (off = 0; off < COW_SECT_BYTES && !*err; off += PAGE_SIZE)
			*err = cow_bb_add_file(c, bb, COW_BLOCK + s * COW_SECT_BYTES + off,
					       ZERO_PAGE(0), 0, PAGE_SIZE);
	}
}

/* queue the write-back of section @s, and the zeroing of its group if new */
static void cow_section_write(struct cow_store *c, struct dbd_bb *bb, u64 s, int *err)
{
	u64 g = cow_group_of(c, s);

	if (!test_bit(g, c->valid))
		cow_group_zero(c, bb, g, err);
	if (!*err)
		cow_section_add(c, bb, s, (u8 *)c->sections[s], err);
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
	/*
	 * @b's bit gets its leaf before the entry changes, so that the final
	 * value (set in dbd_round_finish, which cannot fail) needs no memory.
	 */
	if (v) {
		unsigned int noio = memalloc_noio_save();

		err = dbd_blkmap_reserve(c->mapped, b, GFP_KERNEL);
		memalloc_noio_restore(noio);
		if (err)
			return err;
	}
	sec = c->sections[s];
	c->hits[s]++;
	sec[b % COW_SECT_ENTRIES] = v;
	__set_bit(s, c->dirty);
	/* after the COW data is durable (dbd_preserve): the hook may now skip @b */
	if (v && !(v & COW_PENDING))
		WARN_ON_ONCE(dbd_blkmap_set(c->mapped, b, GFP_NOWAIT));	/* reserved above */
	else
		dbd_blkmap_clear(c->mapped, b);
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
 * sections (at least down to the limit), as upstream does.  The limit gives
 * way to the block maps' leaves (ours and @other_bytes, the caller's), so
 * that cache and leaves together stay within the configured cache size
 * while the leaves alone fit in it.  Our writes to the file are not
 * reported as changed (the file's extents are outside what a backup image
 * must match), so incremental mode trims too.  Worker context, or with the
 * worker paused.
 */
int cow_cache_trim(struct cow_store *c, u64 other_bytes)
{
	struct cow_victim *v;
	struct dbd_io io;
	struct dbd_bb bb;
	unsigned int noio;
	u64 limit = READ_ONCE(c->max_resident), keep, n = 0, nv, s, i;
	u64 leaves = DIV_ROUND_UP(dbd_blkmap_leaf_bytes(c->mapped) + other_bytes, COW_SECT_BYTES);
	int err = 0;

	limit = limit > leaves ? limit - leaves : 0;
	if (c->nresident <= limit)
		return 0;
	noio = memalloc_noio_save();
	v = kvmalloc_array(c->nresident, sizeof(*v), GFP_KERNEL);
	memalloc_noio_restore(noio);
	if (!v)
		return 0;	/* try again after the next batch */
	for (s = 0; s < c->nsect && n < c->nresident; s++)
		if (c->sections[s])
			v[n++] = (struct cow_victim){ .hits = c->hits[s], .s = s };
	sort(v, n, sizeof(*v), cow_victim_cmp, NULL);
	keep = min(limit, c->nresident / 2);
	nv = min(n, c->nresident - keep);

	dbd_io_init(&io);
	dbd_bb_init(&bb, c->bdev, REQ_OP_WRITE, &io);
	mutex_lock(&c->ext_mutex);
	for (i = 0; i < nv && !err; i++)
		if (test_bit(v[i].s, c->dirty))
			cow_section_write(c, &bb, v[i].s, &err);
	err = cow_submit_unlock_wait(c, &bb, &io, err);
	if (err) {
		LOG_ERROR(err, "error writing back cow index sections");
		kvfree(v);
		return err;
	}
	for (i = 0; i < nv; i++) {
		s = v[i].s;
		if (test_bit(s, c->dirty))
			set_bit(cow_group_of(c, s), c->valid);
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
enum cow_smap_fill { COW_SMAP_NONE, COW_SMAP_EMPTY, COW_SMAP_CURRENT };
static void cow_fill_block0(struct cow_store *c, u8 *blk, u32 flags, enum cow_smap_fill map);

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

/* a growing, merged list of extents in file order */
struct ext_list {
	struct dbd_extent *e;
	unsigned int n, cap;
};

static int ext_list_init(struct ext_list *l, const struct dbd_extent *from, unsigned int n)
{
	l->cap = n + 16;
	l->n = n;
	l->e = kvmalloc_array(l->cap, sizeof(*l->e), GFP_KERNEL);
	if (!l->e)
		return -ENOMEM;
	if (n)
		memcpy(l->e, from, n * sizeof(*l->e));
	return 0;
}

/* append file sectors [fsect, fsect + nr) at device sector dsect, merging runs */
static int ext_list_add(struct ext_list *l, u64 fsect, u64 dsect, u64 nr)
{
	struct dbd_extent *last = l->n ? &l->e[l->n - 1] : NULL;

	if (last && last->fsect + last->nr == fsect && last->dsect + last->nr == dsect) {
		last->nr += nr;
		return 0;
	}
	if (l->n == l->cap) {
		struct dbd_extent *ne = kvmalloc_array(l->cap * 2, sizeof(*ne), GFP_KERNEL);

		if (!ne)
			return -ENOMEM;
		memcpy(ne, l->e, l->n * sizeof(*ne));
		kvfree(l->e);
		l->e = ne;
		l->cap *= 2;
	}
	l->e[l->n++] = (struct dbd_extent){ .fsect = fsect, .dsect = dsect, .nr = nr };
	return 0;
}

static void ext_list_install(struct cow_store *c, struct ext_list *l)
{
	kvfree(c->ext);
	c->ext = l->e;
	c->n_ext = l->n;
	l->e = NULL;
}

/*
 * Map file bytes [start, end) with bmap() and append them to c->ext.  Every
 * block must be mapped and written (bmap reports no unwritten extent): used
 * for areas added by expansion, which are zero-filled first.
 */
static int cow_map_range(struct cow_store *c, struct inode *inode, u64 start, u64 end)
{
	unsigned int bits = inode->i_blkbits;
	u64 spb = 1ULL << (bits - 9);
	u64 blk, first = start >> bits, last = (end + (1ULL << bits) - 1) >> bits;
	struct ext_list l;
	int err = ext_list_init(&l, c->ext, c->n_ext);

	for (blk = first; blk < last && !err; blk++) {
		sector_t pb = blk;

		if (bmap(inode, &pb) || pb == 0) {
			LOG_ERROR(-EIO, "cow file block %llu is not mapped", blk);
			err = -EIO;
			break;
		}
		err = ext_list_add(&l, blk * spb, (u64)pb * spb, spb);
		if (!(blk & 1023))
			cond_resched();
	}
	if (!err)
		ext_list_install(c, &l);
	kvfree(l.e);
	return err;
}

/* extents whose blocks we cannot write beneath the filesystem */
#define DBD_FIEMAP_REFUSED (FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_DELALLOC | \
			    FIEMAP_EXTENT_ENCODED | FIEMAP_EXTENT_DATA_ENCRYPTED | \
			    FIEMAP_EXTENT_NOT_ALIGNED | FIEMAP_EXTENT_DATA_INLINE | \
			    FIEMAP_EXTENT_DATA_TAIL | FIEMAP_EXTENT_SHARED)
#define DBD_FIEMAP_BATCH 128

/*
 * Map file bytes [0, @len) with the filesystem's fiemap, which unlike bmap()
 * reports unwritten (preallocated, never written) extents with their place on
 * the device.  fiemap only fills a user-space buffer, so this borrows the
 * calling task's address space: ioctl and mount callers have one; a kernel
 * thread has none and gets -EAGAIN (the caller tries again later).  *@holes
 * (when given) tells whether some byte is not allocated; without it a hole
 * is an error.  Shared (reflinked) extents are refused: a write beneath the
 * filesystem would change the other file too.
 */
static int cow_map_fiemap(struct cow_store *c, struct inode *inode, u64 len, bool *holes,
			  struct ext_list *out)
{
	size_t ubytes = DBD_FIEMAP_BATCH * sizeof(struct fiemap_extent);
	struct fiemap_extent *kx = NULL;
	unsigned long uaddr;
	u64 covered = 0, pos = 0;
	bool last = false;
	int err;

	if (!current->mm || (current->flags & PF_KTHREAD))
		return -EAGAIN;
	if (!inode->i_op->fiemap)
		return -EOPNOTSUPP;
	err = ext_list_init(out, NULL, 0);
	if (err)
		return err;
	uaddr = vm_mmap(NULL, 0, ubytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, 0);
	if (IS_ERR_VALUE(uaddr)) {
		err = (int)uaddr;
		goto out;
	}
	kx = kmalloc(ubytes, GFP_KERNEL);
	if (!kx) {
		err = -ENOMEM;
		goto out;
	}
	while (!last && pos < len) {
		struct fiemap_extent_info fi = {
			.fi_extents_max = DBD_FIEMAP_BATCH,
			.fi_extents_start = (struct fiemap_extent __user *)uaddr,
		};
		unsigned int i;

		err = inode->i_op->fiemap(inode, &fi, pos, len - pos);
		if (err)
			break;
		if (!fi.fi_extents_mapped)
			break;
		if (copy_from_user(kx, (void __user *)uaddr,
				   fi.fi_extents_mapped * sizeof(*kx))) {
			err = -EFAULT;
			break;
		}
		for (i = 0; i < fi.fi_extents_mapped && !err; i++) {
			struct fiemap_extent *x = &kx[i];
			u64 lo = max(x->fe_logical, covered), hi = min(x->fe_logical + x->fe_length, len);

			if (x->fe_flags & FIEMAP_EXTENT_LAST)
				last = true;
			if (x->fe_flags & DBD_FIEMAP_REFUSED) {
				LOG_ERROR(-EINVAL, "cow file extent at %llu cannot be written beneath the filesystem (fiemap flags 0x%x)",
					  x->fe_logical, x->fe_flags);
				err = -EINVAL;
				break;
			}
			if (hi <= lo)
				continue;
			if (lo > covered) {
				if (!holes) {
					LOG_ERROR(-EIO, "cow file bytes %llu-%llu are not allocated", covered, lo);
					err = -EIO;
					break;
				}
				*holes = true;
			}
			err = ext_list_add(out, lo >> 9, (x->fe_physical + (lo - x->fe_logical)) >> 9,
					   (hi - lo) >> 9);
			covered = hi;
		}
		pos = kx[fi.fi_extents_mapped - 1].fe_logical + kx[fi.fi_extents_mapped - 1].fe_length;
		cond_resched();
	}
	if (!err && covered < len) {
		if (!holes) {
			LOG_ERROR(-EIO, "cow file bytes %llu-%llu are not allocated", covered, len);
			err = -EIO;
		} else {
			*holes = true;
		}
	}
out:
	kfree(kx);
	if (!IS_ERR_VALUE(uaddr))
		vm_munmap(uaddr, ubytes);
	if (err) {
		kvfree(out->e);
		out->e = NULL;
	}
	return err;
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

/*
 * A bitmap of @bits bits, zeroed, that may be large (one bit per block or
 * data slot).  Beyond a few pages it is vmalloc'ed: kmalloc would round a
 * request just past a power of two up to the next one, and a 64 GiB
 * volume's bitmap plus a word came out twice its size.
 */
unsigned long *cow_bitmap_alloc(u64 bits)
{
	size_t bytes = max_t(u64, BITS_TO_LONGS(bits), 1) * sizeof(unsigned long);

	return bytes > 4 * PAGE_SIZE ? vzalloc(bytes) : kzalloc(bytes, GFP_KERNEL);
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
	c->mapped = dbd_blkmap_alloc(c->ntrack);
	c->on_disk = cow_bitmap_alloc(c->nsect);
	c->dirty = cow_bitmap_alloc(c->nsect);
	c->hits = kvcalloc(c->nsect, sizeof(u32), GFP_KERNEL);
	c->group = cow_smap_group(c->nsect);
	c->ngroups = DIV_ROUND_UP(c->nsect, c->group);
	c->valid = cow_bitmap_alloc(c->ngroups);
	c->max_resident = U64_MAX;	/* until cow_set_cache() */
	c->hdr0 = kzalloc(COW_BLOCK, GFP_KERNEL);
	if (!c->sections || !c->mapped || !c->on_disk || !c->dirty || !c->hits || !c->valid ||
	    !c->hdr0) {
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

/* write @len bytes of @buf at @pos through the VFS, all or an error */
static int cow_vfs_write(struct file *f, const void *buf, size_t len, loff_t pos)
{
	ssize_t w = kernel_write(f, buf, len, &pos);

	return w == len ? 0 : (w < 0 ? w : -EIO);
}

/*
 * Reserve the file's blocks without writing them: fallocate() leaves
 * unwritten extents, so the cost does not grow with the size and nothing but
 * metadata is written (an incremental period that creates the next file
 * records only those blocks).  Two blocks are written through the VFS: the
 * header (update-img and reload read it through the filesystem), and the
 * last block, so that the unwritten extents of the file are never adjacent
 * to an area an expansion adds and converts (see cow_expand()).  Both are
 * written back before the layout is captured, so no later writeback of ours
 * can reach the file beneath what we write by bio.
 * Without fallocate support the whole file is zero-filled (written extents
 * read back by bio as the zeros the section map then promises).
 */
static int cow_reserve(struct cow_store *c, struct file *f)
{
	bool zero_filled = false;
	int err;

	err = vfs_fallocate(f, 0, 0, c->alloc_len);
	if (err == -EOPNOTSUPP) {
		err = cow_zero_fill(f, COW_BLOCK, c->alloc_len);
		zero_filled = true;
	}
	if (err) {
		LOG_ERROR(err, "error preallocating cow file");
		return err;
	}
	/* the initial header: also what the snapshot shows of it, and what a reload rebuilds */
	cow_fill_block0(c, c->hdr0, 0, COW_SMAP_EMPTY);
	if (zero_filled)
		bitmap_fill(c->valid, c->ngroups);	/* written with the next header */
	err = cow_vfs_write(f, c->hdr0, COW_BLOCK, 0);
	if (!err && !zero_filled)
		err = cow_vfs_write(f, page_address(ZERO_PAGE(0)), COW_BLOCK,
				    c->alloc_len - COW_BLOCK);
	if (!err)
		err = filemap_write_and_wait(f->f_mapping);
	if (err)
		LOG_ERROR(err, "error writing cow header");
	return err;
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
	struct ext_list l = { 0 };
	struct file *f;
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

	/* step 9: must live on the traced filesystem (checked before allocating) */
	if (file_inode(f)->i_sb != dbd_bdev_super(bdev) || file_inode(f)->i_sb->s_bdev != bdev) {
		err = -EINVAL;
		LOG_ERROR(err, "cow file must be on the traced filesystem");
		goto fail;
	}
	/* steps 7 and 8: preallocation, dirty header */
	err = cow_reserve(c, f);
	if (!err)
		err = cow_map_fiemap(c, file_inode(f), c->alloc_len, NULL, &l);
	if (err == -EAGAIN)
		err = -EINVAL;	/* no address space to map with: not an ioctl caller */
	if (!err) {
		ext_list_install(c, &l);
		err = cow_rebuild_dext(c);
	}
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

/* read section @s of the file by bio into @buf (ext_mutex not held) */
static int cow_section_read(struct cow_store *c, u64 s, void *buf)
{
	struct dbd_io io;
	struct dbd_bb bb;
	int err = 0;

	dbd_io_init(&io);
	dbd_bb_init(&bb, c->bdev, REQ_OP_READ, &io);
	mutex_lock(&c->ext_mutex);
	cow_section_add(c, &bb, s, buf, &err);
	return cow_submit_unlock_wait(c, &bb, &io, err);
}

/*
 * A file of another writer (no section map) may end in an unwritten extent,
 * which an expansion would convert together with the area it adds: write
 * its last block through the VFS first, when that reads as zeros (a
 * preallocated block, or zeros anyway), before anything is written beneath.
 */
static int cow_write_tail(struct cow_store *c, struct file *f)
{
	loff_t pos = c->alloc_len - COW_BLOCK;
	void *blk = kmalloc(COW_BLOCK, GFP_KERNEL);
	int err = 0;

	if (!blk)
		return -ENOMEM;
	if (kernel_read(f, blk, COW_BLOCK, &pos) != COW_BLOCK)
		err = -EIO;
	else if (!memchr_inv(blk, 0, COW_BLOCK))
		err = cow_vfs_write(f, blk, COW_BLOCK, c->alloc_len - COW_BLOCK);
	if (!err)
		err = filemap_write_and_wait(f->f_mapping);
	kfree(blk);
	return err;
}

/*
 * Capture the layout of a file to load: every byte allocated.  A file made
 * sparse elsewhere (a handed-over index) gets its holes preallocated, which
 * converts nothing.
 */
static int cow_map_existing(struct cow_store *c, struct file *f)
{
	struct ext_list l;
	bool holes = false;
	int err = cow_map_fiemap(c, file_inode(f), c->alloc_len, &holes, &l);

	if (!err && holes) {
		kvfree(l.e);
		err = vfs_fallocate(f, 0, 0, c->alloc_len);
		if (!err)
			err = cow_map_fiemap(c, file_inode(f), c->alloc_len, NULL, &l);
	}
	if (err)
		return err;
	ext_list_install(c, &l);
	return cow_rebuild_dext(c);
}

/* the section map of a header block: 1 when present (c->valid filled), 0 when absent */
static int cow_read_smap(struct cow_store *c, const u8 *blk)
{
	const u8 *m = blk + COW_SMAP_OFF;
	__le32 group, nbits;
	u64 g;

	if (memcmp(m, COW_SMAP_MAGIC, 8))
		return 0;
	memcpy(&group, m + 8, 4);
	memcpy(&nbits, m + 12, 4);
	if (le32_to_cpu(group) != c->group || le32_to_cpu(nbits) != c->ngroups) {
		LOG_ERROR(-EINVAL, "cow file section map (%u sections a bit, %u bits) does not fit this device (%llu, %llu)",
			  le32_to_cpu(group), le32_to_cpu(nbits), c->group, c->ngroups);
		return -EINVAL;
	}
	m += COW_SMAP_HDR;
	for (g = 0; g < c->ngroups; g++)
		if (m[g / 8] & (1 << (g % 8)))
			set_bit(g, c->valid);
	return 1;
}

/*
 * Index of a file without a section map (upstream's): read through the
 * filesystem, which shows never-written sections as zeros.  A section that
 * holds entries is in written extents, so reading it back by bio later is
 * right; the other sections of its group are zeroed beneath the filesystem
 * now, so that the section map we write from now on can say so.
 */
static int cow_validate_loaded(struct cow_store *c)
{
	struct dbd_io io;
	struct dbd_bb bb;
	u64 s, g, last = U64_MAX;
	int err = 0;

	dbd_io_init(&io);
	dbd_bb_init(&bb, c->bdev, REQ_OP_WRITE, &io);
	mutex_lock(&c->ext_mutex);
	for (s = 0; s < c->nsect && !err; s++) {
		if (!c->sections[s] && !test_bit(s, c->on_disk))
			continue;
		g = cow_group_of(c, s);
		if (g != last)
			cow_group_zero(c, &bb, g, &err);
		last = g;
	}
	err = cow_submit_unlock_wait(c, &bb, &io, err);
	if (err)
		return err;
	for (s = 0; s < c->nsect; s++)
		if (c->sections[s] || test_bit(s, c->on_disk))
			set_bit(cow_group_of(c, s), c->valid);
	return 0;
}

/*
 * Load an existing, cleanly closed COW file for activation of a reloaded
 * tracer (spec 4.4 "reload or reopen").  The header is read through the VFS
 * (nothing else has the file open yet); the index is read by bio where the
 * section map says it is, or through the VFS for a file without one.  @f
 * must be open for writing (holes get preallocated).  -EAGAIN: no address
 * space to capture the layout with (kernel thread); try again later.
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
	int smap;
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
	smap = cow_read_smap(c, buf);
	if (smap < 0) {
		err = smap;
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
		cow_fill_block0(c, c->hdr0, 0, smap ? COW_SMAP_EMPTY : COW_SMAP_NONE);
		c->fpos = fpos;
		atomic64_set(&c->nr_changed, nr);
	}
	err = smap ? 0 : cow_write_tail(c, f);
	if (!err)
		err = cow_map_existing(c, f);
	if (err)
		goto fail;
	if (snap) {
		used = cow_bitmap_alloc(c->fpos - c->first_data_block);
		if (!used) {
			err = -ENOMEM;
			goto fail;
		}
	}
	for (s = 0; s < c->nsect; s++) {
		u64 *sec;

		if (smap) {
			if (!test_bit(cow_group_of(c, s), c->valid))
				continue;
			err = cow_section_read(c, s, buf);
			if (err) {
				LOG_ERROR(err, "error reading cow index section %llu", s);
				goto fail;
			}
		} else {
			pos = COW_BLOCK + s * COW_SECT_BYTES;
			if (kernel_read(f, buf, COW_SECT_BYTES, &pos) != COW_SECT_BYTES) {
				err = -EIO;
				LOG_ERROR(err, "error reading cow index section %llu", s);
				goto fail;
			}
		}
		if (!memchr_inv(buf, 0, COW_SECT_BYTES))
			continue;
		err = cow_check_section(c, s, buf, used, snap);
		if (err)
			goto fail;
		for (i = 0; i < COW_SECT_ENTRIES && s * COW_SECT_ENTRIES + i < c->ntrack && !err; i++)
			if (((u64 *)buf)[i])
				err = dbd_blkmap_set(c->mapped, s * COW_SECT_ENTRIES + i, GFP_KERNEL);
		if (err)
			goto fail;
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
	if (!smap) {
		err = cow_validate_loaded(c);
		if (err)
			goto fail;
	}
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
	struct ext_list l;
	int err;

	if (round_down(i_size_read(file_inode(f)), COW_BLOCK) != c->alloc_len)
		return -EINVAL;
	err = cow_map_fiemap(c, file_inode(f), c->alloc_len, NULL, &l);
	if (err)
		return err;
	mutex_lock(&c->ext_mutex);
	if (l.n != c->n_ext || memcmp(l.e, c->ext, c->n_ext * sizeof(*l.e)))
		err = -EINVAL;
	mutex_unlock(&c->ext_mutex);
	kvfree(l.e);
	return err;
}

/*
 * Write the index and then the header (flags) by bio.  Fold the incremental
 * bitmap in first.  Only sections changed since they were last written go
 * out (and the zeros of a group written for the first time).
 */
int cow_finalize(struct cow_store *c, u32 flags, struct dbd_blkmap *changed)
{
	struct dbd_io io;
	struct dbd_bb bb;
	u64 s, b;
	int err = 0;

	/* section by section, so that no more than the cache limit is resident */
	for (s = 0; changed && s < c->nsect; s++) {
		u64 end = min((s + 1) * COW_SECT_ENTRIES, c->ntrack);

		for (b = dbd_blkmap_next(changed, s * COW_SECT_ENTRIES, end); b < end;
		     b = dbd_blkmap_next(changed, b + 1, end)) {
			if (cow_mapped(c, b))
				continue;
			err = cow_entry_set(c, b, 1);
			if (err)
				return err;
		}
		err = cow_cache_trim(c, dbd_blkmap_leaf_bytes(changed));
		if (err)
			return err;
		cond_resched();
	}
	c->flags = flags;
	dbd_io_init(&io);
	dbd_bb_init(&bb, c->bdev, REQ_OP_WRITE, &io);
	mutex_lock(&c->ext_mutex);
	for (s = 0; s < c->nsect && !err; s++)
		if (c->sections[s] && test_bit(s, c->dirty))
			cow_section_write(c, &bb, s, &err);
	err = cow_submit_unlock_wait(c, &bb, &io, err);
	if (err) {
		LOG_ERROR(err, "error writing cow index");
		return err;
	}
	for (s = 0; s < c->nsect; s++)
		if (c->sections[s] && test_bit(s, c->dirty))
			set_bit(cow_group_of(c, s), c->valid);
	bitmap_zero(c->dirty, c->nsect);

	return cow_write_header(c, flags);
}

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

/* the header block: struct cow_header, then the section map */
static void cow_fill_block0(struct cow_store *c, u8 *blk, u32 flags, enum cow_smap_fill map)
{
	u8 *m = blk + COW_SMAP_OFF;
	u64 g;

	memset(blk, 0, COW_BLOCK);
	cow_fill_header(c, (struct cow_header *)blk, flags);
	if (map == COW_SMAP_NONE)
		return;
	memcpy(m, COW_SMAP_MAGIC, 8);
	{
		__le32 group = cpu_to_le32((u32)c->group), nbits = cpu_to_le32((u32)c->ngroups);

		memcpy(m + 8, &group, 4);
		memcpy(m + 12, &nbits, 4);
	}
	m += COW_SMAP_HDR;
	if (map == COW_SMAP_EMPTY)
		return;
	for (g = find_first_bit(c->valid, c->ngroups); g < c->ngroups;
	     g = find_next_bit(c->valid, c->ngroups, g + 1))
		m[g / 8] |= 1 << (g % 8);
}

static int cow_write_block0(struct cow_store *c, struct page *hp, u32 flags)
{
	struct dbd_io io;
	struct dbd_bb bb;
	void *a = dbd_kmap(hp);
	int err;

	cow_fill_block0(c, a, flags, COW_SMAP_CURRENT);
	dbd_kunmap(a);
	dbd_io_init(&io);
	dbd_bb_init(&bb, c->bdev, REQ_OP_WRITE | REQ_FUA, &io);
	mutex_lock(&c->ext_mutex);
	err = cow_bb_add_file(c, &bb, 0, hp, 0, PAGE_SIZE);
	return cow_submit_unlock_wait(c, &bb, &io, err);
}

/* write the header with @flags (FUA), by bio */
int cow_write_header(struct cow_store *c, u32 flags)
{
	struct page *hp;
	int err = 0;

	hp = alloc_page(GFP_KERNEL);
	if (!hp)
		return -ENOMEM;
	/*
	 * A CLEAN header promises a complete index: the index sections written
	 * before it must be durable first (found by write-point replay: a crash
	 * could leave CLEAN with an all-zero index).  An empty flush, not
	 * PREFLUSH on the header itself: dm resubmits a flush-with-data's data
	 * part from its own context, where the hook would take it for an origin
	 * write.  FUA makes the header durable before we go on, which a dirty
	 * header needs so that later index changes never precede it on disk.
	 * The section map spans all eight sectors of the block: it goes out
	 * with a dirty header first, so that a torn clean write can only leave
	 * the flags old, never the map.
	 */
	if (flags & COW_CLEAN) {
		err = cow_write_block0(c, hp, flags & ~COW_CLEAN);
		if (!err)
			err = cow_flush_device(c->bdev);
		if (err) {
			__free_page(hp);
			LOG_ERROR(err, "error flushing the cow index before its clean header");
			return err;
		}
	}
	err = cow_write_block0(c, hp, flags);
	__free_page(hp);
	if (err)
		LOG_ERROR(err, "error writing cow header");
	else
		c->clean_on_disk = flags & COW_CLEAN;
	/* readers through the VFS must see what we wrote beneath the page cache */
	dbd_pin_invalidate(c->pin);
	return err;
}

/*
 * Hand the index of an incremental period over to update-img: write it,
 * with the bits of @changed folded in, into the new file @f through the VFS
 * (a sparse file: sections without entries stay holes), fsync, then the
 * CLEAN|INDEX_ONLY header and fsync again.  The index we kept beneath the
 * filesystem is invisible to readers of the old file, which the caller has
 * unlinked; its blocks stay ours (pinned) until @c is freed, so evicted
 * sections are read back from there.  A crash before the header leaves a
 * file without one, which update-img refuses.  Runs while the next snapshot
 * is live: these are ordinary writes, preserved and tracked like any other.
 */
int cow_handover(struct cow_store *c, struct dbd_blkmap *changed, struct file *f)
{
	u64 *buf = kvmalloc(COW_SECT_BYTES, GFP_KERNEL);
	u64 s, b, nr = 0;
	int err;

	if (!buf)
		return -ENOMEM;
	err = vfs_truncate(&f->f_path, c->data_offset);
	for (s = 0; s < c->nsect && !err; s++) {
		u64 first = s * COW_SECT_ENTRIES, end = min(first + COW_SECT_ENTRIES, c->ntrack);
		bool any = false;

		if (c->sections[s])
			memcpy(buf, c->sections[s], COW_SECT_BYTES);
		else if (test_bit(s, c->on_disk))
			err = cow_section_read(c, s, buf);
		else if (!changed || dbd_blkmap_next(changed, first, end) >= end)
			continue;	/* nothing to write: a hole; no scan of the whole volume's index */
		else
			memset(buf, 0, COW_SECT_BYTES);
		if (err)
			break;
		for (b = changed ? dbd_blkmap_next(changed, first, end) : end; b < end;
		     b = dbd_blkmap_next(changed, b + 1, end))
			if (!buf[b - first])
				buf[b - first] = 1;
		for (b = first; b < end; b++)
			if (buf[b - first]) {
				nr++;
				any = true;
			}
		if (any)
			err = cow_vfs_write(f, buf, COW_SECT_BYTES, COW_BLOCK + s * COW_SECT_BYTES);
		cond_resched();
	}
	if (!err)
		err = vfs_fsync(f, 0);
	if (!err) {
		struct cow_header *h = (struct cow_header *)buf;

		memset(buf, 0, COW_BLOCK);
		c->fsize = c->data_offset;
		if (c->version >= 1)
			atomic64_set(&c->nr_changed, nr);
		cow_fill_header(c, h, COW_CLEAN | COW_INDEX_ONLY);
		err = cow_vfs_write(f, buf, COW_BLOCK, 0);
	}
	if (!err)
		err = vfs_fsync(f, 0);
	kvfree(buf);
	if (err)
		LOG_ERROR(err, "error writing the index for update-img");
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
	dbd_blkmap_free(c->mapped);
	kvfree(c->on_disk);
	kvfree(c->dirty);
	kvfree(c->hits);
	kvfree(c->valid);
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
