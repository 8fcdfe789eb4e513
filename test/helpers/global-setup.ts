// Placeholder replaced by the database/Redis run setup.
export default function setup(): void {}
