// SPDX-License-Identifier: GPL-2.0
/*
 * Tracer table entries and their state machine (setup, transitions,
 * destroy, reconfigure, info, expand), plus the per-tracer worker thread.
 *
 * All entry points run under dbd_ctl_mutex (taken by ctl.c / proc.c).
 */
#include <linux/kthread.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>
#include <linux/uuid.h>
#include <linux/namei.h>
#include <linux/sort.h>
#include <linux/statfs.h>
#include <linux/bitmap.h>
#include <linux/file.h>
#include <linux/xarray.h>
#include "dattobd.h"

struct workqueue_struct *dbd_wq;

/* ---- helpers -------------------------------------------------------------- */
unsigned long dbd_cache_size(struct dbd_tracer *tr)
{
	return tr->cache_size ? tr->cache_size : dbd_cow_max_memory_default;
}

int dbd_tracer_error(struct dbd_tracer *tr)
{
	return atomic_read(&tr->error);
}

bool dbd_tracer_busy(struct dbd_tracer *tr)
{
	return tr->disk && atomic_read(&tr->open_count) > 0;
}

static void dbd_tracer_release(struct kref *k)
{
	struct dbd_tracer *tr = container_of(k, struct dbd_tracer, ref);

	kfree(tr->bdev_path);
	kfree(tr->cow_path);
	xa_destroy(&tr->pre);
	kfree(tr);
}

void dbd_tracer_put(struct dbd_tracer *tr)
{
	kref_put(&tr->ref, dbd_tracer_release);
}

/*
 * Delete the COW file of @c (pinned by @tr), found again through the
 * filesystem; if it cannot be reached the file is only released.
 */
static void dbd_delete_cow(struct dbd_tracer *tr, struct cow_store *c, const char *relpath)
{
	struct file *f = dbd_open_in_fs(tr->bdev, tr->bdev_path, relpath, O_RDONLY);
	int err = PTR_ERR_OR_ZERO(f);

	cow_unpin(c);
	if (!err) {
		err = dbd_vfs_unlink(f);
		fput(f);
	}
	if (err)
		LOG_ERROR(err, "error deleting cow file '%s' of minor %u", relpath, tr->minor);
}

static void dbd_fail_work(struct work_struct *w)
{
	struct dbd_tracer *tr = container_of(w, struct dbd_tracer, fail_work);
	struct cow_store *c;

	mutex_lock(&dbd_ctl_mutex);
	c = tr->cow;
	if (!tr->dead && c && c->pin) {
		LOG_DEBUG("deleting cow file of failed tracer %u", tr->minor);
		dbd_delete_cow(tr, c, tr->cow_path);
	} else if (!tr->dead && c && c->clean_on_disk) {
		/* dormant: the change list is incomplete from now on */
		if (cow_write_header(c, c->flags & ~COW_CLEAN))
			LOG_WARN("minor %u: could not mark the cow file dirty after the failure",
				 tr->minor);
	}
	mutex_unlock(&dbd_ctl_mutex);
	dbd_tracer_put(tr);
}

/* Record the first failure; from now on writes pass untracked. */
void dbd_tracer_fail(struct dbd_tracer *tr, int err)
{
	if (atomic_cmpxchg(&tr->error, 0, err) != 0)
		return;
	LOG_ERROR(err, "tracer for minor %u failed", tr->minor);
	dbd_hook_set_mode(tr, DBD_HOOK_PASS);
	kref_get(&tr->ref);
	if (!queue_work(dbd_wq, &tr->fail_work))
		dbd_tracer_put(tr);
}

/* ---- auto-expand ------------------------------------------------------------ */
/*
 * Expansion enters the filesystem (fallocate, zero-fill, fsync), so it can
 * never run in the COW worker: the filesystem's own journal writes may need
 * copy-on-write by that worker.  It runs from dbd_wq instead, and is started
 * a little before the COW file is full (DBD_AE_MARGIN) so the worker can keep
 * copying from the margin (max(4 MiB, step/2), at most half the file) while
 * the expansion is in progress.  Only when the
 * margin is exhausted does the worker wait (bounded) and then fail with EFBIG.
 */
#define DBD_AE_MARGIN (4ULL << 20)
#define DBD_AE_WAIT (30 * HZ)

static void dbd_ae_work(struct work_struct *w)
{
	struct dbd_tracer *tr = container_of(w, struct dbd_tracer, ae_work);
	struct cow_store *c;

	mutex_lock(&dbd_ctl_mutex);
	c = tr->cow;
	if (!tr->dead && tr->ae_set && tr->ae_step && !dbd_tracer_error(tr) &&
	    tr->state == (DBD_STATE_SNAPSHOT | DBD_STATE_ACTIVE) && c && c->pin) {
		struct kstatfs st;
		bool ok;
		struct file *f = dbd_open_in_fs(tr->bdev, tr->bdev_path, tr->cow_path, O_RDWR);
		int err = PTR_ERR_OR_ZERO(f);

		if (!err)
			err = vfs_statfs(&f->f_path, &st);

		if (err) {
			ok = tr->ae_reserved == 0;
		} else {
			u64 need = DIV_ROUND_UP((tr->ae_step + tr->ae_reserved) << 20,
						max_t(u64, st.f_bsize, 1));

			ok = need <= st.f_bavail;
		}
		if (IS_ERR(f)) {
			LOG_ERROR(PTR_ERR(f), "auto-expand of minor %u cannot open the cow file",
				  tr->minor);
		} else if (ok) {
			err = cow_expand(tr, c, f, tr->ae_step << 20);
			if (err)
				LOG_ERROR(err, "auto-expand of minor %u failed", tr->minor);
			else
				LOG_DEBUG("auto-expanded minor %u by %llu MiB", tr->minor, tr->ae_step);
		} else {
			LOG_DEBUG("auto-expand of minor %u refused: not enough free space", tr->minor);
		}
		if (!IS_ERR(f))
			fput(f);
	}
	clear_bit(0, &tr->ae_running);
	wake_up_all(&tr->ae_wait);
	mutex_unlock(&dbd_ctl_mutex);
	dbd_tracer_put(tr);
}

/* start an expansion if configured; false when auto-expand is off */
static bool dbd_ae_request(struct dbd_tracer *tr)
{
	if (!READ_ONCE(tr->ae_set) || !READ_ONCE(tr->ae_step))
		return false;
	if (!test_and_set_bit(0, &tr->ae_running)) {
		kref_get(&tr->ref);
		if (!queue_work(dbd_wq, &tr->ae_work)) {
			clear_bit(0, &tr->ae_running);
			dbd_tracer_put(tr);
		}
	}
	return true;
}

static struct dbd_tracer *dbd_tracer_alloc(unsigned int minor)
{
	struct dbd_tracer *tr = kzalloc(sizeof(*tr), GFP_KERNEL);

	if (!tr)
		return NULL;
	tr->minor = minor;
	kref_init(&tr->ref);
	atomic_set(&tr->error, 0);
	atomic_set(&tr->open_count, 0);
	spin_lock_init(&tr->qlock);
	bio_list_init(&tr->writes);
	bio_list_init(&tr->reads);
	init_waitqueue_head(&tr->qwait);
	spin_lock_init(&tr->rlock);
	INIT_LIST_HEAD(&tr->rtrack);
	init_waitqueue_head(&tr->rwait);
	INIT_WORK(&tr->fail_work, dbd_fail_work);
	INIT_WORK(&tr->ae_work, dbd_ae_work);
	init_waitqueue_head(&tr->ae_wait);
	mutex_init(&tr->wlock);
	xa_init(&tr->pre);
	return tr;
}

static int dbd_get(unsigned int minor, bool busy_check, struct dbd_tracer **out)
{
	struct dbd_tracer *tr;

	if (minor >= dbd_max_minors)
		return -EINVAL;
	tr = dbd_minors[minor];
	if (!tr)
		return -ENOENT;
	if (busy_check && dbd_tracer_busy(tr))
		return -EBUSY;
	*out = tr;
	return 0;
}

static int dbd_check_free(unsigned int minor)
{
	if (minor >= dbd_max_minors)
		return -EINVAL;
	if (dbd_minors[minor])
		return -EBUSY;
	return 0;
}

static void dbd_teardown(struct dbd_tracer *tr);

/*
 * First step of every request that makes a tracer (setup, reload): the minor
 * must be free, then a new tracer holds the block device open.  On failure
 * nothing is left behind.
 */
static int dbd_tracer_open(unsigned int minor, const char *bdev_path, struct dbd_tracer **out)
{
	struct dbd_tracer *tr;
	int err = dbd_check_free(minor);

	if (err)
		return err;
	tr = dbd_tracer_alloc(minor);
	if (!tr)
		return -ENOMEM;
	err = dbd_bdev_open(bdev_path, &tr->bh);
	if (err) {
		LOG_ERROR(err, "error opening block device '%s'", bdev_path);
		dbd_teardown(tr);
		dbd_tracer_put(tr);
		return err;
	}
	tr->bdev = tr->bh.bdev;
	*out = tr;
	return 0;
}

/* Last step: the tracer is complete; its minor now answers requests. */
static void dbd_tracer_publish(struct dbd_tracer *tr, unsigned long state)
{
	tr->state = state;
	dbd_minors[tr->minor] = tr;
	dbd_lifecycle_track(1);
}

static bool dbd_writable_mounted(struct block_device *bdev)
{
	struct super_block *sb = dbd_bdev_super(bdev);

	return sb && !sb_rdonly(sb);
}

static int dbd_canonical_path(const char *in, char **out)
{
	struct path p;
	char *buf, *s;
	int err;

	err = kern_path(in, LOOKUP_FOLLOW, &p);
	if (err)
		return err;
	buf = kmalloc(PATH_MAX, GFP_KERNEL);
	if (!buf) {
		path_put(&p);
		return -ENOMEM;
	}
	s = d_path(&p, buf, PATH_MAX);
	path_put(&p);
	if (IS_ERR(s)) {
		kfree(buf);
		return PTR_ERR(s);
	}
	*out = kstrdup(s, GFP_KERNEL);
	kfree(buf);
	return *out ? 0 : -ENOMEM;
}

/* ---- worker --------------------------------------------------------------- */
/*
 * Blocks preserved per round: 4 MiB, read with all their bios in flight.  A
 * batch of four parallel 1 MiB writers then costs one read round and one COW
 * write instead of four of each one after the other, and all four writes are
 * released as soon as their old data is in memory.
 */
#define DBD_CHUNK 1024

/*
 * One round of preservation: the blocks, the pages their old data is read
 * into, and the COW write that puts the pages in consecutive slots of the
 * file.  The worker keeps two rounds and alternates: while the COW write of
 * one is in flight, the writes that arrive meanwhile are gathered into the
 * other and their old data is read, so the reads of a round overlap the COW
 * write of the round before.  At most one COW write is in flight, so a round
 * whose COW write completed implies that every earlier one did too.
 * Preallocated per tracer: 8 MiB of pages.
 */
struct dbd_round {
	struct dbd_tracer *tr;
	struct cow_store *c;		/* the file of the COW write in flight */
	struct page *pages[DBD_CHUNK];
	u64 blks[DBD_CHUNK];
	unsigned int n;			/* blocks gathered (all PENDING) */
	u64 fpos;			/* first slot, reserved before the reads */
	struct dbd_io io;		/* the COW write */
	bool in_flight;			/* COW write submitted, not yet published */
	bool written;			/* its completion ran (worker wakes on it) */
	struct bio_list ordered;	/* writes held until the COW data completed */
};

struct dbd_wctx {
	struct dbd_round r[2];
	unsigned int cur;		/* the round being gathered */
};

static int cmp_u64(const void *a, const void *b)
{
	u64 x = *(const u64 *)a, y = *(const u64 *)b;

	return x < y ? -1 : x > y;
}

/*
 * Bytes of block @b on the origin: a whole block, or what exists of a partial
 * last block, whose copy in @pg is padded with zeros (a read past the end of
 * the device would fail).
 */
static unsigned int dbd_origin_bytes(struct dbd_tracer *tr, u64 b, struct page *pg)
{
	sector_t left = tr->nr_sects - b * COW_BLOCK_SECTS;
	unsigned int n;
	u8 *a;

	if (left >= COW_BLOCK_SECTS)
		return PAGE_SIZE;
	n = left << 9;
	a = dbd_kmap(pg);
	memset(a + n, 0, PAGE_SIZE - n);
	dbd_kunmap(a);
	return n;
}

/* a write whose completion promises durability of what completed before it */
static bool dbd_bio_orders(struct bio *bio)
{
	return bio->bi_opf & (REQ_PREFLUSH | REQ_FUA);
}

static void dbd_release_write(struct dbd_tracer *tr, struct bio *bio, bool wait_reads);

/*
 * Once the old data of every block they cover is in memory, the held writes
 * may reach the origin while that data is still on its way to the COW file:
 * the overwrite no longer destroys anything the snapshot needs, snapshot
 * reads are served by this worker only after the COW write completed, and a
 * crash before it completes leaves the COW file dirty (active), which reload
 * refuses to trust.  Writes carrying PREFLUSH or FUA stay held: their
 * completion must imply that the COW data of earlier writes is durable.
 */
static void dbd_release_unordered(struct dbd_tracer *tr, struct bio_list *held)
{
	struct bio_list ordered;
	struct bio *bio;

	bio_list_init(&ordered);
	while ((bio = bio_list_pop(held))) {
		if (dbd_bio_orders(bio))
			bio_list_add(&ordered, bio);
		else
			dbd_release_write(tr, bio, true);
	}
	*held = ordered;
}

/* forget the PENDING entries of a round that will not be published */
static void dbd_round_drop(struct cow_store *c, struct dbd_round *r)
{
	unsigned int i;

	for (i = 0; i < r->n; i++)
		cow_entry_set(c, r->blks[i], 0);
	r->n = 0;
}

/*
 * Reserve slots for r->blks (auto-expanding the file if it is short) and read
 * their old data from the origin into r->pages.  The slots are taken from
 * c->fpos now, so the next round's reservation follows them while this
 * round's COW write is still in flight.
 */
static int dbd_round_read(struct dbd_tracer *tr, struct cow_store *c, struct dbd_round *r)
{
	struct dbd_io io;
	struct dbd_bb bb;
	unsigned int i, n = r->n;
	int err = 0;

	sort(r->blks, n, sizeof(u64), cmp_u64, NULL);
	/* dormant: the clean index on disk is about to become stale */
	if (c->clean_on_disk) {
		err = cow_write_header(c, c->flags & ~COW_CLEAN);
		if (err)
			return err;
	}

	mutex_lock(&c->ext_mutex);
	/* a slot occupies [fpos*4096, fpos*4096+4096): it must fit within fsize */
	while ((c->fpos + n) * COW_BLOCK > c->fsize) {
		u64 old = c->fsize;

		if (!dbd_ae_request(tr)) {
			LOG_DEBUG("cow file of minor %u full (fpos %llu, %u blocks, fsize %llu)",
				  tr->minor, c->fpos, n, c->fsize);
			err = -EFBIG;
			goto out;
		}
		mutex_unlock(&c->ext_mutex);
		wait_event_timeout(tr->ae_wait, !test_bit(0, &tr->ae_running) || READ_ONCE(tr->dead) ||
				   !READ_ONCE(tr->ae_set), DBD_AE_WAIT);
		mutex_lock(&c->ext_mutex);
		if (c->fsize == old) {
			LOG_DEBUG("cow file of minor %u full, auto-expand did not help", tr->minor);
			err = -EFBIG;
			goto out;
		}
	}
	if (c->fsize - (c->fpos + n) * COW_BLOCK <
	    min(max(DBD_AE_MARGIN, (READ_ONCE(tr->ae_step) << 20) / 2), c->fsize / 2))
		dbd_ae_request(tr);	/* expand ahead of time, don't wait */
	r->fpos = c->fpos;
	c->fpos += n;
	mutex_unlock(&c->ext_mutex);

	dbd_io_init(&io);
	dbd_bb_init(&bb, tr->bdev, REQ_OP_READ, &io);
	for (i = 0; i < n; i++)
		dbd_bb_add(&bb, r->blks[i] * COW_BLOCK_SECTS, r->pages[i],
			   dbd_origin_bytes(tr, r->blks[i], r->pages[i]), 0);
	dbd_bb_submit(&bb);
	err = dbd_io_wait(&io);
	if (!err)
		return 0;
	mutex_lock(&c->ext_mutex);
	if (c->fpos == r->fpos + n)
		c->fpos = r->fpos;	/* give the slots back: nothing follows them */
out:
	mutex_unlock(&c->ext_mutex);
	return err;
}

/* completion of a round's COW write (any context): wake the worker */
static void dbd_round_written(struct dbd_io *io)
{
	struct dbd_round *r = container_of(io, struct dbd_round, io);
	struct dbd_tracer *tr = r->tr;

	/*
	 * A hint for the worker's wait; the data is ordered by the completion.
	 * Testing completion_done() instead would need complete() before the
	 * wake_up(), and once the worker sees the completion the round may be
	 * reused and the tracer torn down and freed: tr is not ours to touch
	 * after complete().  So the flag and the wake come first.
	 */
	WRITE_ONCE(r->written, true);
	wake_up(&tr->qwait);
	/* last: once the worker's wait for it returns, the round may be reused */
	complete(&io->done);
}

/* write a round's pages to its slots; completes asynchronously */
static void dbd_round_write(struct cow_store *c, struct dbd_round *r)
{
	struct dbd_bb bb;
	unsigned int i;
	int err = 0;

	dbd_io_init(&r->io);
	r->c = c;
	r->io.done_fn = dbd_round_written;
	r->written = false;
	r->in_flight = true;
	dbd_bb_init(&bb, r->tr->bdev, REQ_OP_WRITE, &r->io);
	mutex_lock(&c->ext_mutex);
	for (i = 0; i < r->n && !err; i++)
		err = cow_bb_add_file(c, &bb, (r->fpos + i) * COW_BLOCK, r->pages[i], 0, PAGE_SIZE);
	dbd_bb_submit(&bb);
	mutex_unlock(&c->ext_mutex);
	if (err)
		r->io.status = err;	/* reported when the round is finished */
	dbd_io_put(&r->io);	/* the submitter's reference: completion may run now */
}

/*
 * Wait for a round's COW write, then publish its index entries (snapshot
 * reads find the copies from now on) and release the writes that waited for
 * the COW data to complete; the COW data lives on the same device, so a
 * later flush covers it.  On error the round is dropped and the tracer fails.
 */
static void dbd_round_finish(struct dbd_tracer *tr, struct dbd_round *r)
{
	struct cow_store *c = r->c;
	struct bio *bio;
	unsigned int i;
	int err;

	if (!r->in_flight)
		return;
	wait_for_completion_io(&r->io.done);
	r->in_flight = false;
	err = r->io.status;
	if (err) {
		dbd_round_drop(c, r);
		dbd_tracer_fail(tr, err);
	}
	for (i = 0; i < r->n; i++) {
		cow_entry_set(c, r->blks[i], r->fpos + i);	/* section exists (PENDING) */
		if (c->version >= 1)
			atomic64_inc(&c->nr_changed);
	}
	r->n = 0;
	err = dbd_tracer_error(tr);
	while ((bio = bio_list_pop(&r->ordered)))
		dbd_release_write(tr, bio, !err);
}

/*
 * Preserve the round being gathered (all its blocks marked PENDING): read the
 * old data, release the writes of @early whose completion promises nothing
 * about earlier data (see dbd_release_unordered), finish the round before
 * (its COW write overlapped these reads), then start this round's COW write
 * and gather into the other round from now on.  Writes left in @early (they
 * carry PREFLUSH or FUA) wait for this round's COW write.
 */
static int dbd_preserve(struct dbd_tracer *tr, struct cow_store *c, struct dbd_wctx *x,
			struct bio_list *early)
{
	struct dbd_round *r = &x->r[x->cur], *prev = &x->r[!x->cur];
	int err = 0;

	if (r->n) {
		err = dbd_round_read(tr, c, r);
		if (err)
			dbd_round_drop(c, r);
	}
	if (!err && early)
		dbd_release_unordered(tr, early);
	dbd_round_finish(tr, prev);
	if (err || !r->n)
		return err;
	dbd_round_write(c, r);
	if (early) {
		bio_list_merge(&r->ordered, early);
		bio_list_init(early);
	}
	x->cur = !x->cur;
	return 0;
}

static void dbd_bio_blocks(struct dbd_tracer *tr, struct bio *bio, u64 *b0, u64 *b1)
{
	dbd_snap_write_blocks(tr, dbd_bio_rel_sector(bio, tr->bdev), bio_sectors(bio), b0, b1);
}

static void dbd_release_write(struct dbd_tracer *tr, struct bio *bio, bool wait_reads)
{
	if (wait_reads) {
		u64 b0, b1;

		dbd_bio_blocks(tr, bio, &b0, &b1);
		/* never let a write overtake a snapshot read of the old data */
		wait_event(tr->rwait, !dbd_rtrack_overlaps(tr, b0, b1));
	}
	submit_bio_noacct(bio);
}

static void dbd_process_writes(struct dbd_tracer *tr, struct bio_list *in, struct dbd_wctx *x)
{
	struct cow_store *c = tr->cow;
	struct bio_list held;
	struct bio *bio;
	int err = 0;

	bio_list_init(&held);
	while ((bio = bio_list_pop(in))) {
		u64 b0, b1, b;

		if (err || dbd_tracer_error(tr) || READ_ONCE(tr->hook_mode) == DBD_HOOK_PASS || !c) {
			bio_list_add(&held, bio);
			continue;
		}
		dbd_bio_blocks(tr, bio, &b0, &b1);
		for (b = b0; b <= b1 && b < tr->nblocks && !err; b++) {
			struct dbd_round *r;

			if (cow_mapped(c, b) || cow_entry_peek(c, b))
				continue;	/* preserved, or pending in a round */
			/* a full round goes now; the last one may release writes early */
			if (x->r[x->cur].n == DBD_CHUNK) {
				err = dbd_preserve(tr, c, x, NULL);
				if (err)
					break;
			}
			err = cow_entry_set(c, b, COW_PENDING);
			if (err)
				break;
			r = &x->r[x->cur];
			r->blks[r->n++] = b;
		}
		bio_list_add(&held, bio);
	}
	if (!err)
		err = dbd_preserve(tr, c, x, &held);
	if (err) {
		dbd_round_drop(c, &x->r[x->cur]);
		dbd_tracer_fail(tr, err);
	}
	err = dbd_tracer_error(tr);
	while ((bio = bio_list_pop(&held)))
		dbd_release_write(tr, bio, !err);
}

/*
 * Rounds started while a COW write was in flight before the worker drains
 * (64 MiB): snapshot reads and index trimming wait for a drained worker.
 */
#define DBD_OVERLAP_MAX 16

/* writes are queued and no snapshot read waits (reads are served drained) */
static bool dbd_writes_only(struct dbd_tracer *tr)
{
	bool more;

	spin_lock_irq(&tr->qlock);
	more = !bio_list_empty(&tr->writes) && bio_list_empty(&tr->reads);
	spin_unlock_irq(&tr->qlock);
	return more;
}

/*
 * While the last round's COW write is in flight, gather the writes that
 * arrive meanwhile and read their old data; finish the round when its write
 * completes, when snapshot reads wait (@reads_wait: taken already), or after
 * DBD_OVERLAP_MAX rounds.  Returns with no COW write in flight, so snapshot
 * reads, index trimming and whoever takes wlock next see every round
 * published.
 */
static void dbd_overlap_rounds(struct dbd_tracer *tr, struct dbd_wctx *x, bool reads_wait)
{
	unsigned int rounds = 0;

	for (;;) {
		struct dbd_round *prev = &x->r[!x->cur];
		struct bio_list w;

		if (!prev->in_flight)
			return;
		if (!reads_wait)
			wait_event(tr->qwait, READ_ONCE(prev->written) || dbd_writes_only(tr));
		if (reads_wait || READ_ONCE(prev->written) || ++rounds > DBD_OVERLAP_MAX ||
		    READ_ONCE(tr->hook_mode) != DBD_HOOK_SNAP || !tr->cow) {
			dbd_round_finish(tr, prev);
			continue;
		}
		spin_lock_irq(&tr->qlock);
		w = tr->writes;
		bio_list_init(&tr->writes);
		spin_unlock_irq(&tr->qlock);
		dbd_process_writes(tr, &w, x);
	}
}

/*
 * Incremental writes that the hook handed over because the header on disk is
 * clean (dormant): make it dirty before the first of them reaches the disk.
 */
static void dbd_inc_process(struct dbd_tracer *tr, struct bio_list *in)
{
	struct cow_store *c = tr->cow;
	struct bio *bio;

	if (c && c->clean_on_disk && !dbd_tracer_error(tr)) {
		int err;

		err = cow_write_header(c, c->flags & ~COW_CLEAN);
		if (err)
			dbd_tracer_fail(tr, err);
	}
	while ((bio = bio_list_pop(in))) {
		if (READ_ONCE(tr->hook_mode) == DBD_HOOK_INC && !dbd_tracer_error(tr)) {
			u64 b0, b1;

			dbd_bio_blocks(tr, bio, &b0, &b1);
			dbd_mark_changed(tr, b0, b1, GFP_NOIO);
		}
		submit_bio_noacct(bio);
	}
}

/*
 * Unverified snapshot (reloaded, file not loaded yet): keep the old data of
 * every block written before activation in memory, so that activation can
 * put it in the COW file where the file has no copy yet.  Bounded; beyond
 * the bound activation fails instead of accepting an altered snapshot.
 */
#define DBD_PRE_MAX 16384	/* blocks (64 MiB) */

static void dbd_pre_process(struct dbd_tracer *tr, struct bio_list *in)
{
	struct bio_list held;
	struct dbd_io io;
	struct dbd_bb bb;
	struct bio *bio;
	int err;

	bio_list_init(&held);
	dbd_io_init(&io);
	dbd_bb_init(&bb, tr->bdev, REQ_OP_READ, &io);
	while ((bio = bio_list_pop(in))) {
		u64 b0, b1, b;

		dbd_bio_blocks(tr, bio, &b0, &b1);
		for (b = b0; b <= b1 && b < tr->nblocks && !tr->pre_lost; b++) {
			struct page *pg;

			if (xa_load(&tr->pre, b))
				continue;
			pg = tr->pre_count < DBD_PRE_MAX ? alloc_page(GFP_NOIO) : NULL;
			if (!pg || xa_err(xa_store(&tr->pre, b, pg, GFP_NOIO))) {
				if (pg)
					__free_page(pg);
				tr->pre_lost = true;
				LOG_WARN("minor %u: too many writes before activation, the reloaded snapshot cannot be kept",
					 tr->minor);
				break;
			}
			tr->pre_count++;
			dbd_bb_add(&bb, b * COW_BLOCK_SECTS, pg, dbd_origin_bytes(tr, b, pg), 0);
		}
		bio_list_add(&held, bio);
	}
	dbd_bb_submit(&bb);
	err = dbd_io_wait(&io);
	if (err && !tr->pre_lost) {
		tr->pre_lost = true;
		LOG_ERROR(err, "minor %u: reading old data before activation failed", tr->minor);
	}
	while ((bio = bio_list_pop(&held)))
		submit_bio_noacct(bio);
}

static void dbd_pre_free(struct dbd_tracer *tr)
{
	struct page *pg;
	unsigned long b;

	xa_for_each(&tr->pre, b, pg)
		__free_page(pg);
	xa_destroy(&tr->pre);
	tr->pre_count = 0;
}

/* Keep the index cache within its limit, between batches (no PENDING entries then). */
static void dbd_trim_index(struct dbd_tracer *tr)
{
	struct cow_store *c = tr->cow;
	int err;

	if (!c || dbd_tracer_error(tr) || !(tr->state & DBD_STATE_ACTIVE))
		return;
	/* only an incremental worker owns the change map: t2s frees it under a COW worker */
	err = cow_cache_trim(c, tr->worker_cow ? 0 :
				dbd_blkmap_leaf_bytes(READ_ONCE(tr->changed)));
	if (err)
		dbd_tracer_fail(tr, err);
}

static void dbd_wctx_free(struct dbd_wctx *x)
{
	unsigned int k, i;

	if (!x)
		return;
	for (k = 0; k < 2; k++)
		for (i = 0; i < DBD_CHUNK; i++)
			if (x->r[k].pages[i])
				__free_page(x->r[k].pages[i]);
	kvfree(x);
}

/* both rounds with their pages, or NULL */
static struct dbd_wctx *dbd_wctx_alloc(struct dbd_tracer *tr)
{
	struct dbd_wctx *x = kvzalloc(sizeof(*x), GFP_KERNEL);
	unsigned int k, i;

	if (!x)
		return NULL;
	for (k = 0; k < 2; k++) {
		x->r[k].tr = tr;
		bio_list_init(&x->r[k].ordered);
		for (i = 0; i < DBD_CHUNK; i++) {
			x->r[k].pages[i] = alloc_page(GFP_KERNEL);
			if (!x->r[k].pages[i]) {
				dbd_wctx_free(x);
				return NULL;
			}
		}
	}
	return x;
}

static int dbd_worker(void *data)
{
	struct dbd_tracer *tr = data;
	struct dbd_wctx *x = NULL;

	/* the rounds' pages (8 MiB) are for COW work: an incremental worker needs none */
	if (READ_ONCE(tr->worker_cow)) {
		x = dbd_wctx_alloc(tr);
		if (!x)
			dbd_tracer_fail(tr, -ENOMEM);
	}

	for (;;) {
		struct bio_list w, r;
		struct bio *bio;
		bool stop;

		wait_event_interruptible(tr->qwait, kthread_should_stop() ||
					 !bio_list_empty(&tr->writes) ||
					 !bio_list_empty(&tr->reads));
		stop = kthread_should_stop();
		spin_lock_irq(&tr->qlock);
		w = tr->writes;
		r = tr->reads;
		bio_list_init(&tr->writes);
		bio_list_init(&tr->reads);
		spin_unlock_irq(&tr->qlock);
		if (bio_list_empty(&w) && bio_list_empty(&r)) {
			if (stop)
				break;
			continue;
		}
		mutex_lock(&tr->wlock);
		switch (READ_ONCE(tr->hook_mode)) {
		case DBD_HOOK_SNAP:
			if (x && tr->cow) {
				dbd_process_writes(tr, &w, x);
				break;
			}
			/* snapshot mode only ever runs a COW worker (transitions restart it) */
			if (WARN_ON_ONCE(!x && !dbd_tracer_error(tr)))
				dbd_tracer_fail(tr, -EINVAL);
			fallthrough;
		case DBD_HOOK_PASS:
			while ((bio = bio_list_pop(&w)))
				submit_bio_noacct(bio);
			break;
		case DBD_HOOK_INC:
			dbd_inc_process(tr, &w);
			break;
		case DBD_HOOK_PRE:
			dbd_pre_process(tr, &w);
			break;
		}
		if (x)
			dbd_overlap_rounds(tr, x, !bio_list_empty(&r));
		while ((bio = bio_list_pop(&r)))
			dbd_snapdev_process_read(tr, bio);
		dbd_trim_index(tr);
		mutex_unlock(&tr->wlock);
	}
	dbd_wctx_free(x);
	return 0;
}

int dbd_start_worker(struct dbd_tracer *tr, bool snap)
{
	struct task_struct *t;

	WRITE_ONCE(tr->worker_cow, snap);
	if (snap)
		t = kthread_run(dbd_worker, tr, "datto_snap_cow%u", tr->minor);
	else
		t = kthread_run(dbd_worker, tr, "datto_inc%u", tr->minor);
	if (IS_ERR(t))
		return PTR_ERR(t);
	get_task_struct(t);
	tr->worker = t;
	return 0;
}

void dbd_stop_worker(struct dbd_tracer *tr)
{
	if (!tr->worker)
		return;
	kthread_stop(tr->worker);
	put_task_struct(tr->worker);
	tr->worker = NULL;
}

/* ---- operations ----------------------------------------------------------- */
static u64 dbd_default_fsize(struct dbd_tracer *tr)
{
	return div_u64((u64)tr->nr_sects * 512 * dbd_cow_fallocate_percentage_default, 100);
}

static int dbd_install_snapshot(struct dbd_tracer *tr)
{
	struct dbd_freeze fz;
	int err;

	err = dbd_freeze(tr->bdev, &fz);
	if (err) {
		LOG_ERROR(err, "error freezing block device");
		return err;
	}
	tr->hook_mode = DBD_HOOK_SNAP;
	err = dbd_hook_add(tr);
	dbd_thaw(tr->bdev, &fz);
	return err;
}

static void dbd_teardown(struct dbd_tracer *tr)
{
	WRITE_ONCE(tr->dead, true);
	wake_up_all(&tr->ae_wait);
	if (tr->hooked) {
		struct dbd_freeze fz = { 0 };
		bool fs = tr->bdev && dbd_bdev_super(tr->bdev);

		if (fs && dbd_freeze(tr->bdev, &fz))
			LOG_WARN("could not freeze the filesystem while removing tracking");
		dbd_hook_del(tr);
		dbd_thaw(tr->bdev, &fz);
	}
	dbd_snapdev_destroy(tr);
	dbd_stop_worker(tr);
	dbd_pre_free(tr);
	if (tr->cow) {
		LOG_DEBUG("minor %u: index cache dropped %llu sections and read back %llu", tr->minor,
			  tr->cow->nr_evicted, tr->cow->nr_loaded);
		/* an active file is deleted; a dormant one (not pinned) is kept, clean */
		if (tr->cow->pin)
			dbd_delete_cow(tr, tr->cow, tr->cow_path);
		cow_free(tr->cow);
		tr->cow = NULL;
	}
	dbd_blkmap_free(tr->changed);
	tr->changed = NULL;
	dbd_bdev_close(&tr->bh);
	tr->bdev = NULL;
}

int dbd_setup_snap(unsigned int minor, const char *bdev_path, const char *cow_path,
		   unsigned long falloc_mib, unsigned long cache_size)
{
	struct dbd_tracer *tr;
	unsigned int i;
	u64 fsize, rec_mib;
	u8 uuid[16];
	int err;

	err = dbd_tracer_open(minor, bdev_path, &tr);
	if (err)
		return err;
	if (!dbd_writable_mounted(tr->bdev)) {
		err = -EINVAL;
		LOG_ERROR(err, "block device '%s' is not mounted writable", bdev_path);
		goto fail;
	}
	for (i = 0; i < dbd_max_minors; i++) {
		struct dbd_tracer *o = dbd_minors[i];

		if (o && !(o->state & DBD_STATE_UNVERIFIED) && o->bdev == tr->bdev) {
			err = -EINVAL;
			LOG_ERROR(err, "block device already traced by minor %u", i);
			goto fail;
		}
	}
	err = dbd_canonical_path(bdev_path, &tr->bdev_path);
	if (err)
		goto fail;
	tr->nr_sects = dbd_bdev_nr_sectors(tr->bdev);
	tr->nblocks = cow_tracked_blocks(tr->nr_sects);
	tr->cache_size = cache_size;
	if (tr->nblocks * COW_BLOCK_SECTS < tr->nr_sects)
		LOG_WARN("minor %u: the last %llu sectors of '%s' are not tracked: the COW index of a device of %llu whole 4 KiB blocks (a multiple of %u) has no entry for a partial block",
			 minor, (u64)(tr->nr_sects % COW_BLOCK_SECTS), bdev_path, tr->nblocks,
			 (unsigned int)COW_SECT_ENTRIES);

	if (!falloc_mib) {
		fsize = dbd_default_fsize(tr);
		rec_mib = fsize >> 20;
	} else {
		fsize = (u64)falloc_mib << 20;
		rec_mib = falloc_mib;
	}
	generate_random_uuid(uuid);
	tr->cow = cow_create(tr->bdev, tr->nr_sects, cow_path, fsize, rec_mib, 1, uuid,
			     &tr->cow_path, &err);
	if (!tr->cow)
		goto fail;
	cow_set_cache(tr->cow, dbd_cache_size(tr));
	err = dbd_snapdev_create(tr);
	if (err)
		goto fail;
	err = dbd_start_worker(tr, true);
	if (err)
		goto fail;
	err = dbd_install_snapshot(tr);
	if (err)
		goto fail;
	err = dbd_snapdev_add(tr);
	if (err)
		goto fail;
	dbd_tracer_publish(tr, DBD_STATE_SNAPSHOT | DBD_STATE_ACTIVE);
	LOG_DEBUG("setup snapshot minor %u on %s, cow %s", minor, tr->bdev_path, tr->cow_path);
	return 0;

fail:
	dbd_teardown(tr);	/* deletes the new cow file, if made */
	dbd_tracer_put(tr);
	return err;
}

/*
 * Register an unverified tracer (4/5).  Unlike upstream, writes are watched
 * from now on: incremental marks them in memory, snapshot keeps their old
 * data in memory, so that activation at the first read-write mount (which
 * itself writes, e.g. the ext4 superblock) leaves no gap.
 */
int dbd_reload(unsigned int minor, const char *bdev_path, const char *cow_path,
	       unsigned long cache_size, bool snap)
{
	struct dbd_tracer *tr;
	int err;

	err = dbd_tracer_open(minor, bdev_path, &tr);
	if (err)
		return err;
	if (dbd_writable_mounted(tr->bdev)) {
		err = -EINVAL;
		LOG_ERROR(err, "reload: block device '%s' is already mounted writable", bdev_path);
		goto fail;
	}
	tr->bdev_path = kstrdup(bdev_path, GFP_KERNEL);
	tr->cow_path = kstrdup(cow_path, GFP_KERNEL);
	tr->nr_sects = dbd_bdev_nr_sectors(tr->bdev);
	tr->nblocks = cow_tracked_blocks(tr->nr_sects);
	err = -ENOMEM;
	if (!tr->bdev_path || !tr->cow_path)
		goto fail;
	tr->cache_size = cache_size;
	if (snap) {
		err = dbd_start_worker(tr, true);
		tr->hook_mode = DBD_HOOK_PRE;
	} else {
		tr->changed = dbd_blkmap_alloc(tr->nblocks);
		err = tr->changed ? dbd_start_worker(tr, false) : -ENOMEM;
		tr->hook_mode = DBD_HOOK_INC;
	}
	if (!err)
		err = dbd_hook_add(tr);
	if (err)
		goto fail;
	dbd_tracer_publish(tr, DBD_STATE_UNVERIFIED | (snap ? DBD_STATE_SNAPSHOT : 0));
	return 0;
fail:
	dbd_teardown(tr);
	dbd_tracer_put(tr);
	return err;
}

int dbd_destroy(unsigned int minor)
{
	struct dbd_tracer *tr;
	int err = dbd_get(minor, true, &tr);

	if (err)
		return err;
	dbd_teardown(tr);
	dbd_minors[minor] = NULL;
	dbd_lifecycle_track(-1);
	dbd_tracer_put(tr);
	LOG_DEBUG("destroyed minor %u", minor);
	return 0;
}

void dbd_destroy_all(void)
{
	unsigned int i;

	mutex_lock(&dbd_ctl_mutex);
	for (i = 0; i < dbd_max_minors; i++) {
		struct dbd_tracer *tr = dbd_minors[i];

		if (!tr)
			continue;
		dbd_teardown(tr);
		dbd_minors[i] = NULL;
		dbd_lifecycle_track(-1);
		dbd_tracer_put(tr);
	}
	mutex_unlock(&dbd_ctl_mutex);
}

/* blocks preserved or changed: a walk over the leaves that exist */
static u64 dbd_count_changed(struct dbd_tracer *tr)
{
	return dbd_blkmap_weight_or(tr->cow->mapped, tr->changed, tr->nblocks);
}

int dbd_transition_inc(unsigned int minor)
{
	struct dbd_tracer *tr;
	struct dbd_freeze fz;
	struct dbd_blkmap *map;
	int err = dbd_get(minor, true, &tr);

	if (err)
		return err;
	if (dbd_tracer_error(tr) || tr->state != (DBD_STATE_SNAPSHOT | DBD_STATE_ACTIVE))
		return -EINVAL;
	map = dbd_blkmap_alloc(tr->nblocks);
	if (!map)
		return -ENOMEM;
	err = dbd_freeze(tr->bdev, &fz);
	if (err) {
		dbd_blkmap_free(map);
		LOG_ERROR(err, "error freezing block device");
		return err;
	}
	dbd_snapdev_destroy(tr);
	WRITE_ONCE(tr->changed, map);
	dbd_hook_set_mode(tr, DBD_HOOK_INC);
	/*
	 * The old worker finishes its queued COW work.  What it wrote to the
	 * file is not reported: the file's extents are outside what a backup
	 * image must match (doc/compat.md).
	 */
	dbd_stop_worker(tr);
	if (tr->cow->version >= 1)
		atomic64_set(&tr->cow->nr_changed, dbd_count_changed(tr));
	dbd_thaw(tr->bdev, &fz);

	err = dbd_tracer_error(tr);
	if (!err) {
		struct file *f = dbd_open_in_fs(tr->bdev, tr->bdev_path, tr->cow_path, O_RDWR);

		cow_truncate_to_index(tr->cow, f);
		if (!IS_ERR(f))
			fput(f);
	} else
		tr->cow->flags |= COW_INDEX_ONLY;
	tr->ae_set = false;
	tr->state = DBD_STATE_ACTIVE;
	{
		int e = dbd_start_worker(tr, false);

		if (e && !err)
			err = e;
	}
	LOG_DEBUG("minor %u transitioned to incremental: %d", minor, err);
	return err;
}

/*
 * The file of the incremental period that just ended goes to update-img.
 * What we wrote of it beneath the filesystem is invisible to its readers
 * (unwritten extents), so the file is unlinked and its index written
 * through the VFS into a new file at the same path (cow_handover()).  The
 * old blocks stay pinned until the caller frees @c.
 */
static int dbd_handover(struct dbd_tracer *tr, struct cow_store *c, struct dbd_blkmap *map,
			const char *relpath)
{
	struct file *f = dbd_open_in_fs(tr->bdev, tr->bdev_path, relpath, O_RDONLY);
	int err;

	if (IS_ERR(f))
		return PTR_ERR(f);
	dbd_set_immutable(file_inode(f), false);
	err = dbd_vfs_unlink(f);
	fput(f);
	if (err)
		return err;
	f = dbd_create_in_fs(tr->bdev, tr->bdev_path, relpath);
	if (IS_ERR(f))
		return PTR_ERR(f);
	err = cow_handover(c, map, f);
	fput(f);
	return err;
}

int dbd_transition_snap(unsigned int minor, const char *cow_path, unsigned long falloc_mib)
{
	struct dbd_tracer *tr;
	struct cow_store *oldc, *newc;
	struct dbd_blkmap *oldmap;
	struct dbd_freeze fz;
	u64 fsize, rec_mib;
	char *newpath = NULL, *oldpath;
	int err = dbd_get(minor, true, &tr);

	if (err)
		return err;
	if (dbd_tracer_error(tr) || tr->state != DBD_STATE_ACTIVE)
		return -EINVAL;
	oldc = tr->cow;
	if (falloc_mib) {
		fsize = (u64)falloc_mib << 20;
		rec_mib = falloc_mib;
	} else if (oldc->falloc_mib) {
		rec_mib = oldc->falloc_mib;
		fsize = rec_mib << 20;
	} else {
		fsize = dbd_default_fsize(tr);
		rec_mib = fsize >> 20;
	}
	if (!falloc_mib) {
		/* never inherit a size that cannot even hold the index (upstream defect 6) */
		u64 min = COW_BLOCK + DIV_ROUND_UP(max_t(u64, tr->nr_sects / COW_BLOCK_SECTS, 1),
						   COW_SECT_ENTRIES) *
			  COW_SECT_BYTES + (1ULL << 20);

		if (fsize < min) {
			fsize = round_up(min, 1ULL << 20);
			rec_mib = fsize >> 20;
		}
	}
	newc = cow_create(tr->bdev, tr->nr_sects, cow_path, fsize, rec_mib, oldc->seqid + 1,
			  oldc->uuid, &newpath, &err);
	if (!newc)
		return err;
	cow_set_cache(newc, dbd_cache_size(tr));
	err = dbd_snapdev_create(tr);
	if (err)
		goto fail_new;
	dbd_stop_worker(tr);	/* the incremental worker has nothing queued */
	err = dbd_start_worker(tr, true);
	if (err)
		goto fail_disk;
	err = dbd_freeze(tr->bdev, &fz);
	if (err) {
		LOG_ERROR(err, "error freezing block device");
		goto fail_worker;
	}
	oldmap = tr->changed;
	WRITE_ONCE(tr->cow, newc);
	WRITE_ONCE(tr->changed, NULL);
	dbd_hook_set_mode(tr, DBD_HOOK_SNAP);
	dbd_thaw(tr->bdev, &fz);
	dbd_hook_sync();

	oldpath = tr->cow_path;
	tr->cow_path = newpath;
	tr->state = DBD_STATE_SNAPSHOT | DBD_STATE_ACTIVE;
	err = dbd_snapdev_add(tr);
	if (err)
		LOG_ERROR(err, "error adding snapshot disk");

	{
		int e = dbd_handover(tr, oldc, oldmap, oldpath);

		if (e)
			LOG_ERROR(e, "minor %u: the change list of '%s' could not be written for update-img: a full backup is needed",
				  minor, oldpath);
		LOG_DEBUG("minor %u: index cache dropped %llu sections and read back %llu", minor,
			  oldc->nr_evicted, oldc->nr_loaded);
	}
	cow_free(oldc);	/* releases the old file's blocks */
	dbd_blkmap_free(oldmap);
	kfree(oldpath);
	LOG_DEBUG("minor %u transitioned to snapshot, cow %s", minor, tr->cow_path);
	return err;

fail_worker:
	dbd_stop_worker(tr);
	dbd_start_worker(tr, false);
fail_disk:
	dbd_snapdev_destroy(tr);
fail_new:
	dbd_delete_cow(tr, newc, newpath);
	kfree(newpath);
	cow_free(newc);
	return err;
}

int dbd_reconfigure(unsigned int minor, unsigned long cache_size)
{
	struct dbd_tracer *tr;
	int err = dbd_get(minor, true, &tr);

	if (err)
		return err;
	if (dbd_tracer_error(tr))
		return -EINVAL;
	tr->cache_size = cache_size;
	if (tr->cow)
		cow_set_cache(tr->cow, dbd_cache_size(tr));	/* the worker trims after its next batch */
	return 0;
}

int dbd_expand(unsigned int minor, u64 size_mib)
{
	struct dbd_tracer *tr;
	int err = dbd_get(minor, false, &tr);

	if (err)
		return err;
	if (dbd_tracer_error(tr) || tr->state != (DBD_STATE_SNAPSHOT | DBD_STATE_ACTIVE) ||
	    !tr->cow || !tr->cow->pin)
		return -EINVAL;
	{
		struct file *f = dbd_open_in_fs(tr->bdev, tr->bdev_path, tr->cow_path, O_RDWR);

		err = PTR_ERR_OR_ZERO(f);
		if (!err) {
			err = cow_expand(tr, tr->cow, f, size_mib << 20);
			fput(f);
		}
	}
	if (err) {
		LOG_ERROR(err, "error expanding cow file");
		dbd_tracer_fail(tr, err);
	}
	return err;
}

int dbd_auto_expand(unsigned int minor, u64 step, u64 reserved)
{
	struct dbd_tracer *tr;
	int err = dbd_get(minor, false, &tr);

	if (err)
		return err;
	if (dbd_tracer_error(tr) || tr->state != (DBD_STATE_SNAPSHOT | DBD_STATE_ACTIVE))
		return -EINVAL;
	tr->ae_set = true;
	tr->ae_step = step;
	tr->ae_reserved = reserved;
	return 0;
}

void dbd_fill_info(struct dbd_tracer *tr, struct dattobd_info *info)
{
	info->minor = tr->minor;
	info->state = tr->state;
	info->error = dbd_tracer_error(tr);
	info->cache_size = dbd_cache_size(tr);
	strscpy(info->cow, tr->cow_path ? tr->cow_path : "", PATH_MAX);
	strscpy(info->bdev, tr->bdev_path ? tr->bdev_path : "", PATH_MAX);
	if (!(tr->state & DBD_STATE_UNVERIFIED) && tr->cow) {
		info->falloc_size = tr->cow->fsize;
		info->seqid = tr->cow->seqid;
		memcpy(info->uuid, tr->cow->uuid, 16);
		info->version = tr->cow->version;
		info->nr_changed_blocks = atomic64_read(&tr->cow->nr_changed);
	} else {
		info->falloc_size = 0;
		info->seqid = 0;
		memset(info->uuid, 0, 16);
	}
}

/* ---- mount lifecycle (called by dbd_reconcile, under dbd_ctl_mutex) ------ */

/*
 * Active -> dormant: the filesystem was unmounted or remounted read-only.
 * The index and a CLEAN header are written while the worker is paused, then
 * the inode is released.  Tracking goes on: the first later write that
 * changes the index makes the header dirty again before it reaches the disk
 * (see dbd_preserve/dbd_inc_process), so a clean header on disk always means
 * a complete change list (upstream keeps such writes only in memory, 9.10).
 */
void dbd_go_dormant(struct dbd_tracer *tr)
{
	struct cow_store *c = tr->cow;
	bool snap = tr->state & DBD_STATE_SNAPSHOT;
	int err;

	tr->ae_set = false;	/* auto-expand settings are dropped by dormancy */
	wake_up_all(&tr->ae_wait);
	/*
	 * From here the hook hands every index-changing write to the worker,
	 * which waits for wlock and then makes the header dirty again first:
	 * no write can slip between the index written below and the CLEAN
	 * header.
	 */
	WRITE_ONCE(c->clean_on_disk, true);
	dbd_hook_sync();
	mutex_lock(&tr->wlock);
	err = cow_finalize(c, COW_CLEAN | (snap ? 0 : COW_INDEX_ONLY), snap ? NULL : tr->changed);
	cow_unpin(c);
	tr->state &= ~DBD_STATE_ACTIVE;
	mutex_unlock(&tr->wlock);
	if (err) {
		LOG_ERROR(err, "minor %u: error closing the cow file at unmount", tr->minor);
		dbd_tracer_fail(tr, err);
		return;
	}
	LOG_DEBUG("minor %u is dormant, cow file %s is clean", tr->minor, tr->cow_path);
}

/* Dormant -> active: the filesystem is read-write again. */
void dbd_wake_dormant(struct dbd_tracer *tr)
{
	struct cow_store *c = tr->cow;
	struct file *f;
	int err;

	f = dbd_open_in_fs(tr->bdev, tr->bdev_path, tr->cow_path, O_RDONLY);
	if (IS_ERR(f)) {
		err = PTR_ERR(f);
		if (err == -EAGAIN)
			return;
		LOG_ERROR(err, "minor %u: cannot reopen cow file '%s' on %s", tr->minor,
			  tr->cow_path, tr->bdev_path);
		goto fail;
	}
	err = cow_same_layout(c, f);
	if (err == -EAGAIN) {
		fput(f);	/* a kernel thread's kick: the next one from a task retries */
		return;
	}
	if (err) {
		LOG_ERROR(err, "minor %u: cow file '%s' was changed while the volume was unmounted",
			  tr->minor, tr->cow_path);
		fput(f);
		goto fail;
	}
	err = cow_pin(c, f);
	fput(f);
	if (err)
		goto fail;
	mutex_lock(&tr->wlock);
	if (c->clean_on_disk)
		err = cow_write_header(c, c->flags & ~COW_CLEAN);
	tr->state |= DBD_STATE_ACTIVE;
	mutex_unlock(&tr->wlock);
	if (err)
		goto fail;
	LOG_DEBUG("minor %u is active again", tr->minor);
	return;
fail:
	dbd_tracer_fail(tr, err);
}

static int dbd_pre_flush(struct cow_store *c, struct page **pages, u64 *blks, unsigned int n)
{
	unsigned int i;
	int err;

	if ((c->fpos + n) * COW_BLOCK > c->fsize)
		return -EFBIG;
	err = cow_write_slots(c, pages, n, c->fpos);
	for (i = 0; i < n && !err; i++) {
		err = cow_entry_set(c, blks[i], c->fpos + i);
		if (!err && c->version >= 1)
			atomic64_inc(&c->nr_changed);
	}
	c->fpos += n;
	return err;
}

/* put the old data kept before activation where the loaded file has none */
static int dbd_pre_merge(struct dbd_tracer *tr, struct cow_store *c)
{
	struct page **pages = kmalloc_array(DBD_CHUNK, sizeof(*pages), GFP_KERNEL);
	u64 *blks = kmalloc_array(DBD_CHUNK, sizeof(*blks), GFP_KERNEL);
	unsigned int n = 0;
	unsigned long b;
	struct page *pg;
	int err = 0;

	if (!pages || !blks) {
		err = -ENOMEM;
		goto out;
	}
	xa_for_each(&tr->pre, b, pg) {
		if (cow_mapped(c, b))
			continue;	/* the file already has the older copy */
		blks[n] = b;
		pages[n++] = pg;
		if (n == DBD_CHUNK) {
			err = dbd_pre_flush(c, pages, blks, n);
			n = 0;
			if (err)
				goto out;
		}
	}
	if (n)
		err = dbd_pre_flush(c, pages, blks, n);
out:
	kfree(pages);
	kfree(blks);
	return err;
}

/*
 * Unverified -> active at the first read-write mount: load the file found at
 * <filesystem root>/<relative path> (checks of spec 4.4), mark its header
 * dirty and start tracking from the state it describes plus what was written
 * since the reload.  On failure the tracer stays unverified with the error
 * set; the next read-write mount tries again (upstream never retries, 9.12).
 */
void dbd_activate_unverified(struct dbd_tracer *tr)
{
	bool snap = tr->state & DBD_STATE_SNAPSHOT;
	struct cow_store *c;
	struct file *f;
	int err;

	atomic_set(&tr->error, 0);
	f = dbd_open_in_fs(tr->bdev, tr->bdev_path, tr->cow_path, O_RDWR);
	if (IS_ERR(f)) {
		err = PTR_ERR(f);
		if (err == -EAGAIN)
			return;
		LOG_ERROR(err, "reload of minor %u: cannot open cow file '%s' on %s", tr->minor,
			  tr->cow_path, tr->bdev_path);
		goto fail;
	}
	c = cow_load(tr->bdev, tr->nr_sects, f, snap, dbd_cache_size(tr), &err);
	if (!c && err == -EAGAIN) {
		fput(f);	/* a kernel thread's kick: the next mount from a task retries */
		tr->tried_sb = NULL;
		return;
	}
	if (!c) {
		LOG_ERROR(err, "reload of minor %u: cow file '%s' on %s refused", tr->minor,
			  tr->cow_path, tr->bdev_path);
		fput(f);
		goto fail;
	}
	err = cow_pin(c, f);
	fput(f);
	if (err)
		goto fail_cow;

	mutex_lock(&tr->wlock);	/* the worker is paused from here */
	err = cow_write_header(c, c->flags & ~COW_CLEAN);
	if (!err && snap) {
		if (tr->pre_lost) {
			err = -EFBIG;
			LOG_ERROR(err, "reload of minor %u: too much was written before activation",
				  tr->minor);
		} else {
			err = dbd_pre_merge(tr, c);
		}
	}
	if (err) {
		mutex_unlock(&tr->wlock);
		goto fail_cow;
	}
	WRITE_ONCE(tr->cow, c);
	if (snap) {
		dbd_pre_free(tr);
		err = dbd_snapdev_create(tr);
		if (!err)
			dbd_hook_set_mode(tr, DBD_HOOK_SNAP);
	}
	mutex_unlock(&tr->wlock);
	dbd_hook_sync();
	if (!snap && c->version >= 1)
		atomic64_set(&c->nr_changed, dbd_count_changed(tr));
	tr->state = (tr->state & DBD_STATE_SNAPSHOT) | DBD_STATE_ACTIVE;
	if (snap && !err)
		err = dbd_snapdev_add(tr);
	if (err) {
		LOG_ERROR(err, "reload of minor %u: error creating the snapshot device", tr->minor);
		dbd_tracer_fail(tr, err);
		return;
	}
	LOG_DEBUG("reloaded minor %u is active (cow %s)", tr->minor, tr->cow_path);
	return;

fail_cow:
	cow_free(c);	/* unpins; the file stays as it was (header untouched or re-dirtied) */
fail:
	atomic_set(&tr->error, err);
}
