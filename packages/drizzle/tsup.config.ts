import { packageBuild } from '../../scripts/tsup-config.ts'

export default packageBuild()
