// SPDX-License-Identifier: GPL-2.0
/*
 * Mount lifecycle: how tracers follow their filesystem through unmount,
 * read-only remount, mount and reboot (states 0/1 dormant, 2/3 active,
 * 4/5 unverified).
 *
 * The module never holds the COW file open (nor its mount) while tracking:
 * every access goes to the file's physical sectors by bio.  That is why an
 * unmount can never fail with EBUSY because of us.  What we do hold is the
 * inode, through an fsnotify mark ("pin"), so the in-memory S_IMMUTABLE flag
 * stays on it; the mark is dropped by the VFS itself when the superblock is
 * shut down, with an FS_UNMOUNT event first.
 *
 * Events only *kick* a reconciliation; dbd_reconcile() then compares every
 * tracer with the current state of its block device, under dbd_ctl_mutex:
 *   active,   no read-write superblock (or pin lost)  -> dormant
 *   dormant,  read-write superblock                   -> active
 *   unverified, read-write superblock                 -> load file, active
 * Kicks come from:
 *   - FS_UNMOUNT on a pinned COW inode (final unmount, any namespace, lazy),
 *   - ftrace observers (never redirects) on vfs_get_tree(), which every new
 *     superblock passes (mount(2) and fsconfig(FSCONFIG_CMD_CREATE) of the
 *     new mount API alike), and on reconfigure_super(), which every
 *     superblock remount passes (mount(2) MS_REMOUNT, fsconfig RECONFIGURE,
 *     emergency remount).
 * A kick from a user task runs as task_work, i.e. before the mount, umount
 * or fsconfig call returns to user space, so "umount returned" means "header
 * is clean on disk" and "mount returned" means "tracking is active".  Kicks
 * from kernel threads run on dbd_wq.
 */
#include <linux/fsnotify_backend.h>
#include <linux/task_work.h>
#include <linux/slab.h>
#include <linux/namei.h>
#include <linux/mount.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/fs_context.h>
#include <linux/ftrace.h>
#include "dattobd.h"

/* ---- pins: an fsnotify mark holds the COW inode -------------------------- */
struct dbd_pin {
	struct fsnotify_mark mark;
	struct mutex lock;
	struct inode *inode;	/* NULL once the superblock went away */
};

static struct fsnotify_group *dbd_fsn_group;
static struct work_struct dbd_kick_work;
static atomic_t dbd_kicks_pending = ATOMIC_INIT(0);
static struct task_struct *dbd_reconcile_task;

void dbd_set_immutable(struct inode *inode, bool on)
{
	inode_lock(inode);
	if (on)
		inode->i_flags |= S_IMMUTABLE;
	else
		inode->i_flags &= ~S_IMMUTABLE;
	inode_unlock(inode);
}

static int dbd_fsn_event(struct fsnotify_mark *mark, u32 mask, struct inode *inode,
			 struct inode *dir, const struct qstr *name, u32 cookie)
{
	struct dbd_pin *p = container_of(mark, struct dbd_pin, mark);

	if (!(mask & FS_UNMOUNT))
		return 0;
	/*
	 * The superblock is being shut down (s_umount held): only forget the
	 * inode and kick; the tracer goes dormant from the kick, without VFS
	 * locks.
	 */
	mutex_lock(&p->lock);
	p->inode = NULL;
	mutex_unlock(&p->lock);
	dbd_lifecycle_kick();
	return 0;
}

static void dbd_fsn_free_mark(struct fsnotify_mark *mark)
{
	kfree(container_of(mark, struct dbd_pin, mark));
}

static const struct fsnotify_ops dbd_fsn_ops = {
	.handle_inode_event = dbd_fsn_event,
	.free_mark = dbd_fsn_free_mark,
};

int dbd_pin_inode(struct inode *inode, struct dbd_pin **out)
{
	struct dbd_pin *p = kzalloc(sizeof(*p), GFP_KERNEL);
	int err;

	if (!p)
		return -ENOMEM;
	mutex_init(&p->lock);
	p->inode = inode;
	fsnotify_init_mark(&p->mark, dbd_fsn_group);
	p->mark.mask = FS_UNMOUNT;
	err = fsnotify_add_inode_mark(&p->mark, inode, 0);
	if (err) {
		fsnotify_put_mark(&p->mark);	/* frees p */
		return err;
	}
	dbd_set_immutable(inode, true);
	*out = p;
	return 0;
}

void dbd_unpin(struct dbd_pin *p)
{
	if (!p)
		return;
	mutex_lock(&p->lock);
	if (p->inode) {
		dbd_set_immutable(p->inode, false);
		invalidate_mapping_pages(p->inode->i_mapping, 0, -1);
		p->inode = NULL;
	}
	mutex_unlock(&p->lock);
	fsnotify_destroy_mark(&p->mark, dbd_fsn_group);
	fsnotify_put_mark(&p->mark);
}

bool dbd_pin_alive(struct dbd_pin *p)
{
	bool alive;

	if (!p)
		return false;
	mutex_lock(&p->lock);
	alive = p->inode != NULL;
	mutex_unlock(&p->lock);
	return alive;
}

/* the page cache of the pinned file no longer matches what we wrote by bio */
void dbd_pin_invalidate(struct dbd_pin *p)
{
	if (!p)
		return;
	mutex_lock(&p->lock);
	if (p->inode)
		invalidate_mapping_pages(p->inode->i_mapping, 0, -1);
	mutex_unlock(&p->lock);
}

/* ---- opening the COW file without holding a mount ------------------------ */
/*
 * A private, unattached mount of the *existing* read-write superblock on
 * @bdev: a file opened through it holds it until fput(); nothing of it is
 * visible to users, and an unmount that races with it completes when the
 * file is closed.  ERR_PTR(-EAGAIN) when the device has no live read-write
 * filesystem (never mounts one itself).
 */
static struct vfsmount *dbd_fs_mount(struct block_device *bdev, const char *bdev_path)
{
	struct super_block *sb = dbd_bdev_super(bdev);
	struct vfsmount *mnt;

	if (!sb || sb_rdonly(sb) || !bdev_path)
		return ERR_PTR(-EAGAIN);
	mnt = vfs_kern_mount(sb->s_type, 0, bdev_path, NULL);
	if (IS_ERR(mnt))
		return mnt;
	if (mnt->mnt_sb != sb || mnt->mnt_sb->s_bdev != bdev) {
		/* the filesystem went away meanwhile: we must not keep our own */
		mntput(mnt);
		return ERR_PTR(-EAGAIN);
	}
	return mnt;
}

/* open <root of the filesystem on @bdev>/<@relpath> through dbd_fs_mount() */
struct file *dbd_open_in_fs(struct block_device *bdev, const char *bdev_path,
			    const char *relpath, int flags)
{
	struct vfsmount *mnt = dbd_fs_mount(bdev, bdev_path);
	struct path p;
	struct file *f;
	int err;

	if (IS_ERR(mnt))
		return ERR_CAST(mnt);
	while (*relpath == '/')
		relpath++;
	err = vfs_path_lookup(mnt->mnt_root, mnt, relpath, 0, &p);
	mntput(mnt);	/* the path (then the file) holds the mount */
	if (err)
		return ERR_PTR(err);
	if (!d_is_reg(p.dentry)) {
		path_put(&p);
		return ERR_PTR(-EINVAL);
	}
	f = dentry_open(&p, flags | O_LARGEFILE, current_cred());
	path_put(&p);
	return f;
}

/*
 * Create <root of the filesystem on @bdev>/<@relpath> (O_EXCL, mode 0) for
 * writing, through a private mount as dbd_open_in_fs() does.
 */
struct file *dbd_create_in_fs(struct block_device *bdev, const char *bdev_path,
			      const char *relpath)
{
	struct vfsmount *mnt = dbd_fs_mount(bdev, bdev_path);
	struct file *f;

	if (IS_ERR(mnt))
		return ERR_CAST(mnt);
	while (*relpath == '/')
		relpath++;
	f = dbd_file_open_root(mnt, relpath, O_RDWR | O_CREAT | O_EXCL | O_LARGEFILE, 0);
	mntput(mnt);	/* the file holds the mount */
	return f;
}

/* ---- kicks ------------------------------------------------------------------ */
struct dbd_kick {
	struct callback_head cb;
};

static void dbd_kick_run(struct callback_head *cb)
{
	kfree(container_of(cb, struct dbd_kick, cb));
	dbd_reconcile();
	atomic_dec(&dbd_kicks_pending);
}

static void dbd_kick_workfn(struct work_struct *w)
{
	dbd_reconcile();
}

/* callable from any context (ftrace callbacks included) */
void dbd_lifecycle_kick(void)
{
	struct task_struct *t = current;
	struct dbd_kick *k;

	if (READ_ONCE(dbd_reconcile_task) == t)
		return;	/* our own mounts and unmounts while reconciling */
	if (!(t->flags & (PF_KTHREAD | PF_EXITING))) {
		k = kmalloc(sizeof(*k), GFP_ATOMIC | __GFP_NOWARN);
		if (k) {
			init_task_work(&k->cb, dbd_kick_run);
			atomic_inc(&dbd_kicks_pending);
			if (!task_work_add(t, &k->cb, TWA_RESUME))
				return;
			atomic_dec(&dbd_kicks_pending);
			kfree(k);
		}
	}
	queue_work(dbd_wq, &dbd_kick_work);
}

static atomic_t dbd_tracer_count = ATOMIC_INIT(0);

void dbd_lifecycle_track(int delta)
{
	atomic_add(delta, &dbd_tracer_count);
}

static void notrace dbd_mount_cb(unsigned long ip, unsigned long parent_ip,
				 struct ftrace_ops *op, dbd_fregs_t *fregs)
{
	if (atomic_read(&dbd_tracer_count) > 0)
		dbd_lifecycle_kick();
}

static struct ftrace_ops dbd_mount_ops = {
	.func = dbd_mount_cb,
	.flags = DBD_FTRACE_FL_RECURSION,
};
static bool dbd_mount_ops_registered;
static bool dbd_remount_observed;
/* not const: ftrace_set_filter() takes a writable buffer */
static char dbd_remount_fn[] = "reconfigure_super";
static char dbd_remount_fn_del[] = "!reconfigure_super";

/* ---- reconcile ---------------------------------------------------------------- */
static bool dbd_rw_super(struct dbd_tracer *tr)
{
	struct super_block *sb = tr->bdev ? dbd_bdev_super(tr->bdev) : NULL;

	return sb && !sb_rdonly(sb) && sb->s_root;
}

void dbd_reconcile(void)
{
	unsigned int i;

	mutex_lock(&dbd_ctl_mutex);
	WRITE_ONCE(dbd_reconcile_task, current);
	for (i = 0; i < dbd_max_minors; i++) {
		struct dbd_tracer *tr = dbd_minors[i];
		struct super_block *sb;
		bool rw;

		if (!tr || !tr->bdev)
			continue;
		rw = dbd_rw_super(tr);
		sb = rw ? dbd_bdev_super(tr->bdev) : NULL;
		if (!rw)
			tr->tried_sb = NULL;
		if (tr->state & DBD_STATE_UNVERIFIED) {
			/* failed activations are retried on the next read-write superblock */
			if (rw && tr->tried_sb != sb) {
				tr->tried_sb = sb;
				dbd_activate_unverified(tr);
			}
			continue;
		}
		if (dbd_tracer_error(tr))
			continue;	/* failed tracers keep their state */
		if ((tr->state & DBD_STATE_ACTIVE) && (!rw || !dbd_pin_alive(tr->cow->pin)))
			dbd_go_dormant(tr);
		if (!(tr->state & DBD_STATE_ACTIVE) && rw && !dbd_tracer_error(tr))
			dbd_wake_dormant(tr);
	}
	WRITE_ONCE(dbd_reconcile_task, NULL);
	mutex_unlock(&dbd_ctl_mutex);
}

/* ---- init/exit ------------------------------------------------------------------ */
/* empty the filter again (an empty filter hash needs no freeing) */
static void dbd_mount_filter_clear(void)
{
	ftrace_set_filter_ip(&dbd_mount_ops, (unsigned long)vfs_get_tree, 1, 0);
	if (dbd_remount_observed)
		ftrace_set_filter(&dbd_mount_ops, dbd_remount_fn_del, strlen(dbd_remount_fn_del), 0);
	dbd_remount_observed = false;
}

int dbd_lifecycle_init(void)
{
	int err;

	INIT_WORK(&dbd_kick_work, dbd_kick_workfn);
	dbd_fsn_group = fsnotify_alloc_group(&dbd_fsn_ops, 0);
	if (IS_ERR(dbd_fsn_group)) {
		err = PTR_ERR(dbd_fsn_group);
		dbd_fsn_group = NULL;
		LOG_ERROR(err, "error allocating fsnotify group");
		return err;
	}
	/*
	 * vfs_get_tree is exported; reconfigure_super is not, and is named for
	 * ftrace's own filter (observed only: never called or redirected).
	 */
	err = ftrace_set_filter_ip(&dbd_mount_ops, (unsigned long)vfs_get_tree, 0, 0);
	if (!err) {
		dbd_remount_observed = !ftrace_set_filter(&dbd_mount_ops, dbd_remount_fn,
							  strlen(dbd_remount_fn), 0);
		if (!dbd_remount_observed)
			LOG_WARN("cannot observe reconfigure_super: read-only remounts will not make tracers dormant");
		err = register_ftrace_function(&dbd_mount_ops);
		if (err)
			dbd_mount_filter_clear();
	}
	if (err) {
		LOG_ERROR(err, "error observing mounts");
		fsnotify_put_group(dbd_fsn_group);
		dbd_fsn_group = NULL;
		return err;
	}
	dbd_mount_ops_registered = true;
	return 0;
}

void dbd_lifecycle_exit(void)
{
	if (dbd_mount_ops_registered) {
		unregister_ftrace_function(&dbd_mount_ops);
		dbd_mount_filter_clear();
		dbd_mount_ops_registered = false;
	}
	/* queued task_work runs our code: wait until every task has run it */
	while (atomic_read(&dbd_kicks_pending))
		schedule_timeout_uninterruptible(HZ / 50);
	cancel_work_sync(&dbd_kick_work);
	if (dbd_fsn_group) {
		fsnotify_wait_marks_destroyed();
		fsnotify_put_group(dbd_fsn_group);
		dbd_fsn_group = NULL;
	}
}
