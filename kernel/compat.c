// SPDX-License-Identifier: GPL-2.0
/* Kernel-version dependent helpers (see compat.h). */
#include <linux/namei.h>
#include <linux/err.h>
#include "compat.h"

int dbd_bdev_open(const char *path, struct dbd_bdev *h)
{
#if defined(DBD_HAVE_BDEV_FILE_OPEN_BY_PATH)
	struct file *f = bdev_file_open_by_path(path, BLK_OPEN_READ, NULL, NULL);

	if (IS_ERR(f))
		return PTR_ERR(f);
	h->file = f;
	h->bdev = file_bdev(f);
	return 0;
#elif defined(DBD_HAVE_BLKDEV_GET_BY_PATH_3)
	struct block_device *b = blkdev_get_by_path(path, FMODE_READ, NULL);

	if (IS_ERR(b))
		return PTR_ERR(b);
	h->bdev = b;
	return 0;
#else
#error "no way to open a block device by path"
#endif
}

void dbd_bdev_close(struct dbd_bdev *h)
{
	if (!h->bdev)
		return;
#if defined(DBD_HAVE_BDEV_FILE_OPEN_BY_PATH)
	fput(h->file);
	h->file = NULL;
#else
	blkdev_put(h->bdev, FMODE_READ);
#endif
	h->bdev = NULL;
}

struct super_block *dbd_bdev_super(struct block_device *bdev)
{
#if defined(DBD_HAVE_BD_SUPER)
	return READ_ONCE(bdev->bd_super);
#elif defined(DBD_HAVE_FS_HOLDER_OPS)
	if (READ_ONCE(bdev->bd_holder_ops) == &fs_holder_ops)
		return READ_ONCE(bdev->bd_holder);
	return NULL;
#else
#error "no way to find the superblock of a block device"
#endif
}

int dbd_freeze(struct block_device *bdev, struct dbd_freeze *f)
{
	f->sb = NULL;
	f->frozen = false;
#if defined(DBD_HAVE_BDEV_FREEZE)
	{
		int r = bdev_freeze(bdev);

		if (r)
			return r;
	}
#elif defined(DBD_HAVE_FREEZE_BDEV_INT)
	{
		int r = freeze_bdev(bdev);

		if (r)
			return r;
	}
#elif defined(DBD_HAVE_FREEZE_BDEV_SB)
	{
		struct super_block *sb = freeze_bdev(bdev);

		if (IS_ERR(sb))
			return PTR_ERR(sb);
		f->sb = sb;
	}
#else
#error "no way to freeze a block device"
#endif
	f->frozen = true;
	return 0;
}

void dbd_thaw(struct block_device *bdev, struct dbd_freeze *f)
{
	int r;

	if (!f->frozen)
		return;
#if defined(DBD_HAVE_BDEV_FREEZE)
	r = bdev_thaw(bdev);
#elif defined(DBD_HAVE_FREEZE_BDEV_INT)
	r = thaw_bdev(bdev);
#else
	r = thaw_bdev(bdev, f->sb);
#endif
	if (r)
		pr_warn("datto: thawing the filesystem failed: %d\n", r);
	f->frozen = false;
}

int dbd_vfs_unlink(struct file *f)
{
	struct dentry *d = f->f_path.dentry;
	struct dentry *dir;
	int err;

	err = mnt_want_write(f->f_path.mnt);
	if (err)
		return err;
	dget(d);	/* like a lookup result: keeps the open file's dentry positive */
	dir = dget_parent(d);
	inode_lock_nested(d_inode(dir), I_MUTEX_PARENT);
	if (d->d_parent == dir && !d_unhashed(d) && d_inode(d)) {
#if defined(DBD_HAVE_MNT_IDMAP)
		err = vfs_unlink(file_mnt_idmap(f), d_inode(dir), d, NULL);
#elif defined(DBD_HAVE_USER_NS_VFS)
		err = vfs_unlink(file_mnt_user_ns(f), d_inode(dir), d, NULL);
#else
		err = vfs_unlink(d_inode(dir), d, NULL);
#endif
	} else {
		err = -ENOENT;
	}
	inode_unlock(d_inode(dir));
	dput(dir);
	dput(d);
	mnt_drop_write(f->f_path.mnt);
	return err;
}

struct gendisk *dbd_alloc_disk(void)
{
#if defined(DBD_HAVE_BLK_ALLOC_DISK_LIM)
	struct queue_limits lim = {
		.max_hw_sectors = DBD_DISK_MAX_SECTORS,
		.physical_block_size = 4096,
		.io_min = 4096,
	};
	struct gendisk *d = blk_alloc_disk(&lim, NUMA_NO_NODE);

	return IS_ERR(d) ? NULL : d;
#elif defined(DBD_HAVE_BLK_ALLOC_DISK_NODE)
	struct gendisk *d = blk_alloc_disk(NUMA_NO_NODE);

	if (d) {
		blk_queue_max_hw_sectors(d->queue, DBD_DISK_MAX_SECTORS);
		blk_queue_physical_block_size(d->queue, 4096);
		blk_queue_io_min(d->queue, 4096);
	}
	return d;
#else
	struct request_queue *q = blk_alloc_queue(NUMA_NO_NODE);
	struct gendisk *d;

	if (!q)
		return NULL;
	d = alloc_disk(1);
	if (!d) {
		blk_cleanup_queue(q);
		return NULL;
	}
	d->queue = q;
	blk_queue_max_hw_sectors(q, DBD_DISK_MAX_SECTORS);
	blk_queue_physical_block_size(q, 4096);
	blk_queue_io_min(q, 4096);
	return d;
#endif
}

int dbd_add_disk(struct gendisk *disk)
{
#ifdef DBD_HAVE_ADD_DISK_INT
	return add_disk(disk);
#else
	add_disk(disk);
	return 0;
#endif
}

void dbd_free_disk(struct gendisk *disk, bool added)
{
	if (added)
		del_gendisk(disk);
#if defined(DBD_HAVE_BLK_QUEUE_CLEANUP) && !defined(DBD_HAVE_BLK_ALLOC_DISK_NODE)
	blk_cleanup_queue(disk->queue);
#endif
	put_disk(disk);
}
